"""Cost of one full PM evaluation against one training round, as the number of clients K grows.

FedPer (a personal head on the shared body) on embedded digits scaled up with K: 16x16 images,
``--train-per-client`` training images per client (IID split, so every client has data; 2 local epochs, batch 16),
a cohort of 10 per round, a balanced test set a fifth the size of the training set and T-A local test sets
drawn from it. One thread,
process CPU time (robust to other load on the machine). For each K the table
gives one training round, one evaluation of every client's PM with the batched path (features once, every
personal head on them) and, up to ``--per-client-max``, with the per-client path (every client's whole model on
its own small batches, what fedlt did before); the ratio is evaluation / round. The evaluation is split into the
body's forward pass over the local test images (the work any evaluation does once per test image; it grows with
the test set, which this benchmark scales with K) and the rest (every client's head, bookkeeping).

    python benchmarks/pm_eval.py                       # K = 100, 1,000, 10,000, 100,000
    python benchmarks/pm_eval.py --clients 100 1000
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time

import torch


def _cpu() -> float:
    return time.process_time()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(k: int, per_client: bool, train_per_client: int) -> dict[str, float]:
    from fedlt.data.federated import FederatedDataset
    from fedlt.data.partition import IID
    from fedlt.data.sources import EmbeddedDigits
    from fedlt.engine.simulator import Simulator
    from fedlt.methods.fedper import FedPer
    from fedlt.models import build_model

    t0 = _cpu()
    per_class = k * train_per_client // 10
    # A test set a fifth of the training set (CIFAR's ratio), so T-A gives every client local test images.
    source = EmbeddedDigits(image_size=16, train_per_class=per_class, test_per_class=max(per_class // 5, 20))
    data = FederatedDataset(source, num_clients=k, partition=IID(), seed=0)
    data.setup("cpu")
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    sim = Simulator(None, data, model, FedPer(lr=0.05, batch_size=16, local_epochs=2), rounds=2,
                    clients_per_round=10, seed=0, eval_every=1, client_state="memory").setup()
    setup = _cpu() - t0
    t0 = _cpu()
    sim.run_round(1)
    round_cpu = _cpu() - t0
    t0 = _cpu()
    batched = sim.evaluate()
    eval_cpu = _cpu() - t0
    # The part every evaluation must pay: one forward pass of the body over the local test images (their union).
    evaluator = sim.evaluator
    t0 = _cpu()
    with torch.no_grad():
        for x, _ in evaluator._batches(evaluator._test_union()):
            sim.method.pm_features(x)
    features_cpu = _cpu() - t0
    out = {"K": k, "setup": setup, "round": round_cpu, "eval": eval_cpu, "features": features_cpu,
           "local_test": sum(int(i.numel()) for i in data.client_test_indices), "rss_gb": _rss_gb()}
    if per_client:
        cls = type(sim.method)
        saved = cls.pm_shares_features
        cls.pm_shares_features = property(lambda self: False)
        try:
            t0 = _cpu()
            reference = sim.evaluate()
            out["eval_per_client"] = _cpu() - t0
        finally:
            cls.pm_shares_features = saved
        same = all(batched[key] == reference[key] or (math.isnan(batched[key]) and math.isnan(reference[key]))
                   for key in reference if key.startswith("test/personal/"))
        out["identical"] = float(same)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", nargs="+", type=int, default=[100, 1000, 10_000, 100_000])
    p.add_argument("--train-per-client", type=int, default=20)
    p.add_argument("--per-client-max", type=int, default=10_000,
                   help="largest K also evaluated with the per-client path")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f}; CPU seconds, one thread; {a.train_per_client} training images "
          "per client")
    print("| K | local test images | round | PM eval (batched) | eval / round | of which the body's forward pass | "
          "the rest (heads, per client) / round | PM eval (per client) | per client / round | identical | "
          "peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in a.clients:
        r = measure(k, k <= a.per_client_max, a.train_per_client)
        per = (f"{r['eval_per_client']:.2f} | {r['eval_per_client'] / r['round']:.1f} | "
               f"{'yes' if r['identical'] else 'NO'}") if "eval_per_client" in r else "- | - | -"
        rest = max(r["eval"] - r["features"], 0.0)
        print(f"| {k:,} | {r['local_test']:,} | {r['round']:.2f} | {r['eval']:.2f} | {r['eval'] / r['round']:.2f} | "
              f"{r['features']:.2f} | {rest / r['round']:.2f} | {per} | {r['rss_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
