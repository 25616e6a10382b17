"""Partition times at scale (100 classes, alpha 0.05): 10^4 clients on 50,000 labels and 10^5 clients on 10^6
labels, per partitioner, in process CPU time (robust to other load) and wall time, plus how fast hopeless requests
fail.

    python benchmarks/partitions.py
    python benchmarks/partitions.py --sizes 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from fedlt.data.equal_partition import DirichletPrior, GroupedDirichlet
from fedlt.data.partition import IID, Dirichlet, DirichletPerSample, PartitionError
from fedlt.data.pooled_partition import DirichletNoCap

LABELS = {10_000: 50_000, 100_000: 1_000_000}


def timed(split: Callable[..., object], labels: np.ndarray, k: int) -> tuple[float, float, str]:
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        split(labels, k, 0)
        outcome = "ok"
    except PartitionError as e:
        outcome = "refused: " + str(e).split(":")[0][:60]
    return time.process_time() - c0, time.perf_counter() - w0, outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=sorted(LABELS), choices=sorted(LABELS))
    a = p.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| clients | labels | partitioner | CPU (s) | wall (s) | outcome |")
    print("|---|---|---|---|---|---|")
    for k in a.sizes:
        n = LABELS[k]
        labels = np.random.default_rng(0).integers(0, 100, n)
        cases = {
            "Dirichlet(alpha 0.05, min_size 0)": Dirichlet(0.05, min_size=0),
            "Dirichlet(alpha 0.05, min_size 1), 100 tries at most": Dirichlet(0.05, min_size=1),
            f"Dirichlet(min_size {n // k}): K x min_size = N": Dirichlet(0.5, min_size=n // k),
            "DirichletPerSample(0.05)": DirichletPerSample(0.05),
            "DirichletNoCap(0.05)": DirichletNoCap(0.05),
            "DirichletPrior(1.0)": DirichletPrior(1.0),
            "GroupedDirichlet(0.05)": GroupedDirichlet(0.05),
            "IID": IID(),
        }
        for name, part in cases.items():
            cpu, wall, outcome = timed(part.split, labels, k)
            print(f"| {k:,} | {n:,} | {name} | {cpu:.2f} | {wall:.2f} | {outcome} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
