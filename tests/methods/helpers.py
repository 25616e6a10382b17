"""Small builders shared by the method tests (imported by path-less name: tests/methods is on sys.path)."""

from __future__ import annotations

import torch

from fedlt.data import Dirichlet, EmbeddedDigits, FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.models import build_model


def tiny_data(num_clients: int = 6, seed: int = 0) -> FederatedDataset:
    """Embedded digits at 16x16, imbalance factor 10, Dirichlet(0.5) over ``num_clients`` clients."""
    source = EmbeddedDigits(image_size=16, train_per_class=200, test_per_class=40, holdout_per_class=40)
    return FederatedDataset(source, num_clients=num_clients, imbalance_factor=10, partition=Dirichlet(0.5, min_size=5),
                            seed=seed)


def tiny_sim(method, model: str = "cnn", rounds: int = 2, clients_per_round: int = 3, seed: int = 0,
             fabric=None, data=None, **kwargs) -> Simulator:
    """A set-up simulator on tiny digits with a small model (initialised from ``seed``)."""
    data = data or tiny_data(seed=seed)
    data.setup("cpu")
    torch.manual_seed(seed)
    model_kwargs = {"channels": (8, 16), "hidden": 32} if model == "cnn" else {}
    net = build_model(model, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size,
                      **model_kwargs)
    return Simulator(fabric, data, net, method, rounds=rounds, clients_per_round=clients_per_round, seed=seed,
                     eval_every=1, client_state="memory", **kwargs).setup()


def run(sim: Simulator, rounds: int | None = None) -> list[dict[str, float]]:
    """Runs the remaining rounds; returns each round's train metrics."""
    out = []
    for r in range(sim.round + 1, (rounds or sim.rounds) + 1):
        out.append(sim.run_round(r).metrics)
    return out


def global_copy(sim: Simulator) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sim.global_state.items()}


# A user's network as it would live in their own package: conv features, then a linear classifier called ``fc``
# (the bring-your-own-model and LightningModule tests import it from a temporary package).
USER_NET_SOURCE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's network: conv features, then a linear classifier called ``fc``."""

    def __init__(self, num_classes, in_channels, width=8):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x))
'''


def user_package(tmp_path, monkeypatch, module: str, source: str) -> None:
    """Writes ``source`` as the importable module ``module`` in a temporary folder on ``sys.path``."""
    import textwrap

    root = tmp_path / "user_pkg"
    path = root.joinpath(*module.split("."))
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.with_suffix(".py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))


def personal_predictions(sim: Simulator, last_key: str, num: int = 8):
    """For a method whose PM is each client's locally trained model: the clients that trained (their stored
    ``last_key`` counter is positive; asserted to be some but not all), the GM logits of ``num`` test images, and
    a generator of ``(client, PM logits)`` that leaves each client loaded in the workspace while it is inspected."""
    data = sim.data
    trained = {c for c in range(data.num_clients) if int(sim.store.get(c).get(last_key, 0)) > 0}
    assert trained and len(trained) < data.num_clients
    x = data.get_batch(data.test, torch.arange(num))[0]
    sim.load_global()
    sim.model.eval()
    gm = sim.method.predict_global(x)

    def clients():
        for cid in range(data.num_clients):
            sim.load_client(cid)
            sim.method.prepare_personal(cid)
            sim.model.eval()
            yield cid, sim.method.predict_personal(x, cid)

    return trained, x, gm, clients()
