"""Training throughput of the round engine: local samples per second and GPU utilisation, per model and cohort.

FedAvg on embedded digits (32 px, 20 training images per client, 2 local epochs, batch 16) with the CNN and the
CIFAR ResNet-8, cohorts of 10, 50 and 100 clients, the sequential engine (the vectorized cohorts of the roadmap
are not implemented yet). Each cell: samples / s over ``--rounds`` timed rounds after one warm-up round, and the
mean GPU utilisation that ``nvidia-smi`` reports meanwhile (on a GPU). Writes a Markdown table to ``--out``.

    python benchmarks/throughput.py --device cuda --out benchmarks/results/gpu_throughput.md
    python benchmarks/throughput.py --device cpu --models cnn --cohorts 10 --rounds 1     # a smoke run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


class _Utilisation:
    """``nvidia-smi`` sampling GPU utilisation every 100 ms while the block runs (nothing without it)."""

    def __enter__(self) -> _Utilisation:
        self.values: list[float] = []
        exe = shutil.which("nvidia-smi")
        self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100", "-i", "0"], stdout=subprocess.PIPE, text=True) if exe else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self.values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None


def measure(model: str, cohort: int, device: str, rounds: int) -> dict[str, float | None]:
    from fedlt.data.federated import FederatedDataset
    from fedlt.data.partition import IID
    from fedlt.data.sources import EmbeddedDigits
    from fedlt.engine.comm import Comm
    from fedlt.engine.simulator import Simulator
    from fedlt.methods.fedavg import FedAvg
    from fedlt.models import build_model

    clients = max(cohort, 100)
    data = FederatedDataset(EmbeddedDigits(image_size=32, train_per_class=clients * 2, test_per_class=20),
                            num_clients=clients, imbalance_factor=None, partition=IID(), seed=0, local_test="none")
    data.setup(device)
    torch.manual_seed(0)
    net = build_model(model, num_classes=10, in_channels=data.in_channels, image_size=32).to(device)
    sim = Simulator(None, data, net, FedAvg(lr=0.05, batch_size=16, local_epochs=2), rounds=rounds + 1,
                    clients_per_round=cohort, seed=0, eval_every=0, client_state="cpu")
    sim.comm = Comm(None, device)  # one process on the chosen device
    sim.setup()
    sim.run_round(1)  # warm-up: kernels, allocator, cuDNN autotuning
    samples = 2 * sum(int(data.client_indices[c].numel()) for c in range(clients)) * cohort / clients
    with _Utilisation() as util:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for r in range(2, rounds + 2):
            sim.run_round(r)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return {"samples_per_s": samples * rounds / wall, "round_s": wall / rounds, "gpu_util": util.mean}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["cnn", "resnet8"])
    p.add_argument("--cohorts", nargs="+", type=int, default=[10, 50, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "CPU"
    lines = [f"# Round-engine throughput ({name}, sequential engine)", "",
             f"Regenerate: `python benchmarks/throughput.py --device {a.device}`", "",
             "| model | cohort | samples / s | s / round | GPU utilisation (%) |", "|---|---|---|---|---|"]
    for model in a.models:
        for cohort in a.cohorts:
            r = measure(model, cohort, a.device, a.rounds)
            util = f"{r['gpu_util']:.0f}" if r["gpu_util"] is not None else "-"
            lines.append(f"| {model} | {cohort} | {r['samples_per_s']:,.0f} | {r['round_s']:.2f} | {util} |")
            print(lines[-1], flush=True)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
