"""Runs every given method for 2 rounds with COHORT clients per round over WORLD CPU ranks (gloo) and saves,
per method, the global state, the client store, the train metrics of both rounds and the evaluation, then runs
its post-training stages (``on_fit_end``, as ``fedlt fit`` does) and saves the global state and the evaluation
after them. One Fabric
launch serves all methods; every rank runs single-threaded, so that launches of any world size compute alike.

Usage: python tests/methods/ddp_worker.py OUT_DIR WORLD COHORT METHOD [METHOD ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


def main(out: Path, world: int, cohort: int, names: list[str]) -> None:
    from test_contract import method_args

    from fedlt.cli import build, make_experiment

    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto")
    fabric.launch()
    for name in names:
        args = ["--config", TINY, *method_args(name), "--trainer.clients_per_round", str(cohort),
                "--method.init_args.batch_size", "16", "--run_dir", str(out / f"{name}-w{world}")]
        exp = make_experiment(*build("fit", args))
        exp.fabric = fabric
        sim = exp.build_simulator()
        train = [sim.run_round(r).metrics for r in (1, 2)]
        for m in train:
            m.pop("time/round_s", None)
        metrics = sim.evaluate()
        store = sim.store.state_dict()
        final = {k: v.detach().cpu().clone() for k, v in sim.global_state.items()}
        sim.store.begin_round(sim.round + 1)
        post = sim.evaluate() if sim.method.on_fit_end(sim) else None
        if fabric.global_rank == 0:
            torch.save({"global": final, "store": store, "train": train, "metrics": metrics, "post": post,
                        "post_global": {k: v.cpu() for k, v in sim.global_state.items()}}, out / f"{name}-w{world}.pt")
        fabric.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
