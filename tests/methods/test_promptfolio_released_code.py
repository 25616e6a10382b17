"""PromptFolio's released-code settings (``PromptFolio.released_code``): the official trainer config's lr 2e-3 and 5
local epochs, the ``--train_batch_size`` default 16 -- against fedlt's defaults (FedPuReL's protocol: 1e-3, 1, 32)."""

from __future__ import annotations

import math

import torch
from helpers import tiny_data

from fedlt.engine.simulator import Simulator
from fedlt.methods.promptfolio import PromptFolio
from fedlt.models import build_model


def _sim(method: PromptFolio) -> Simulator:
    """The tiny CLIP with prompt PEFT on the tiny digits (as tests/methods/test_clip_baselines.py)."""
    data = tiny_data(seed=0)
    data.setup("cpu")
    torch.manual_seed(0)
    net = build_model("clip:fedlt-tiny-clip", num_classes=data.num_classes, in_channels=data.in_channels,
                      image_size=data.image_size, class_names=list(data.class_names), dataset=data.source_name,
                      peft="prompt")
    return Simulator(None, data, net, method, rounds=1, clients_per_round=3, seed=0, eval_every=1,
                     client_state="memory").setup()


def test_released_code_values():
    assert PromptFolio.released_code == {"lr": 0.002, "local_epochs": 5, "batch_size": 16}
    default = PromptFolio()
    assert (default.lr, default.local_epochs, default.batch_size) == (1e-3, 1, 32)


def test_released_code_local_fit_takes_the_codes_steps_and_lr():
    """One client's local fit: E ceil(n_k / B) SGD steps, and the first step is p - lr (g + wd p) with the code's lr
    (momentum's buffer starts at the first gradient)."""
    steps = {}
    for name, kwargs in (("paper", {}), ("code", PromptFolio.released_code)):
        sim = _sim(PromptFolio(**kwargs))
        m, n_k = sim.method, int(sim.data.client_indices[0].numel())
        _, steps[name] = sim.train_client(0, sim.reducer.broadcast(1))
        assert steps[name] == m.local_epochs * math.ceil(n_k / m.batch_size)
        (opt,) = m.configure_optimizers()
        assert opt.param_groups[0]["lr"] == m.lr
        # A hand-written first SGD step at this lr on one batch.
        x, y = sim.data.get_batch(sim.data.train, sim.data.client_indices[0][:8], None, train=False)[:2]
        params = [p for p in sim.model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(m.portfolio_logits(x), y), params)
        opt.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, p0, g in zip(params, start, grads):
            torch.testing.assert_close(p.detach(), p0 - m.lr * (g + m.weight_decay * p0), rtol=1e-5, atol=1e-7)
    assert steps["code"] > steps["paper"]
