"""Bytes a round's checkpoint writes, against cohort x personal state + global state, as K grows.

FedPer on embedded digits scaled up with K (``--train-per-client`` images per client, IID, cohort 10, cpu client
store), the checkpoint written as ``fedlt fit`` writes it every round (the checkpoint file and the client-state
journal file, ``fedlt.engine.checkpoint.ClientJournal``). Reports the mean bytes per round over ``--rounds``
rounds after the first (which writes the base file of all K states; every client has stored its head once before,
as in a long run), the target (cohort x one client's personal state + the global state), their ratio, what a
checkpoint holding every client's state writes every round (before the journal), and the peak resident memory.

    python benchmarks/checkpoint_bytes.py                       # K = 10,000 and 100,000
    python benchmarks/checkpoint_bytes.py --clients 10000 --rounds 20
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch


def _nbytes(obj) -> int:
    """Tensor bytes in a nested state (what a checkpoint of it writes, less a little pickle overhead)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def measure(k: int, rounds: int, train_per_client: int) -> dict[str, float]:
    from fedlt.data.federated import FederatedDataset
    from fedlt.data.partition import IID
    from fedlt.data.sources import EmbeddedDigits
    from fedlt.engine.checkpoint import ClientJournal, save_atomic
    from fedlt.engine.simulator import Simulator
    from fedlt.methods.fedper import FedPer
    from fedlt.models import build_model

    source = EmbeddedDigits(image_size=16, train_per_class=k * train_per_client // 10, test_per_class=20)
    data = FederatedDataset(source, num_clients=k, partition=IID(), seed=0, local_test="none")
    data.setup("cpu")
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    sim = Simulator(None, data, model, FedPer(lr=0.05, batch_size=16, local_epochs=1), rounds=rounds,
                    clients_per_round=10, seed=0, eval_every=0, client_state="cpu").setup()
    # A long run's steady state: every client has trained (and stored its head) once before the measured rounds.
    head = {"model." + k: v for k, v in sim._default_personal.items()}
    for c in range(k):
        sim.store.put(c, head)
    with tempfile.TemporaryDirectory() as tmp:
        journal = ClientJournal(Path(tmp) / "clients")
        written, previous = [], None
        for r in range(1, rounds + 1):
            sim.run_round(r)
            state = sim.state_dict(client_states=False)
            manifest = journal.record(r, sim.store.states(), sim.store.take_dirty())
            state["store"] = {**state["store"], "journal": manifest}
            ckpt = save_atomic({"simulator": state}, Path(tmp) / f"round_{r:05d}.ckpt")
            new = [f for f in manifest["files"] if f not in (previous or [])]  # the files this checkpoint wrote
            client_bytes = sum((Path(tmp) / "clients" / f).stat().st_size for f in new)
            written.append(ckpt.stat().st_size + client_bytes)
            previous = manifest["files"]
            (Path(tmp) / f"round_{r:05d}.ckpt").unlink()
        personal = sum(t.numel() * t.element_size() for t in next(iter(sim.store.states().values())).values())
        global_bytes = sum(t.numel() * t.element_size() for t in sim.global_state.values())
        full = _nbytes(sim.state_dict())
    steady = written[1:] if len(written) > 1 else written  # round 1 writes the base: every client's state
    return {"K": k, "per_round": sum(steady) / len(steady), "first": written[0],
            "target": 10 * personal + global_bytes, "full": full,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", nargs="+", type=int, default=[10_000, 100_000])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train-per-client", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| K | bytes / round (rounds 2+) | round 1 | target: cohort x personal + global | ratio | "
          "full-state checkpoint (tensor bytes) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for k in a.clients:
        r = measure(k, a.rounds, a.train_per_client)
        print(f"| {k:,} | {r['per_round'] / 1e6:.2f} MB | {r['first'] / 1e6:.2f} MB | {r['target'] / 1e6:.2f} MB | "
              f"{r['per_round'] / r['target']:.2f} | {r['full'] / 1e6:.1f} MB | {r['rss_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
