"""Round time of fedlt's engine against a plain PyTorch FedAvg loop on the fixed workloads W1 and W2.

The workloads (their data generation and checksums), the timing rule and the reference sampler / permutation are
defined in this file (``WORKLOADS``, ``ReferenceSampler``, ``permutation_seed``). Both implementations run the same
computation in one process, alternating in passes, and the figure of merit is the ratio fedlt / plain loop of
the medians of 10 timed rounds (after 2 warm-up rounds): the machine's drift between processes cancels.

Usage::

    python benchmarks/round_overhead.py --workload all [--passes 2] [--devices N] [--json out.json]
    python benchmarks/round_overhead.py --workload w1 --check   # correctness only
    python benchmarks/round_overhead.py --workload w2 --float-reduction   # + the exact reduction's cost

With ``--devices N > 1`` Fabric re-executes this script once per rank (DDP on CPU); the plain loop still
runs single-process (with the process's default thread count) on rank 0 while the other ranks wait at a
barrier, and the fedlt rounds are timed on rank 0, each started right after a barrier.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.data import FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.methods import FedAvg
from fedlt.models import build_model

WARMUP_ROUNDS = 2
TIMED_ROUNDS = 10
CHECK_ROUNDS = 3
CHECK_TOL = 1e-4
_CHECKSUM_TOL = 1e-5  # the spec quotes the float64 sums to 6 decimals


@dataclass(frozen=True)
class Workload:
    """One fixed workload: data shape, model, cohort and local SGD settings."""

    name: str
    num_clients: int
    samples: int
    cohort: int
    batch_size: int
    lr: float
    momentum: float
    sum_x: float
    sum_y: int
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)


WORKLOADS = {
    "w1": Workload("w1", 100, 20, 10, 10, 0.05, 0.0, -404.555689, 9086, "mlp", {"in_features": 64, "hidden": 128}),
    "w2": Workload("w2", 50, 256, 10, 32, 0.01, 0.9, -9058.770840, 57170, "cnn", {"in_channels": 3, "image_size": 32}),
}


def make_data(w: Workload) -> tuple[Tensor, Tensor]:
    """Generates the workload's data (a fixed recipe) and verifies its checksums.

    Returns:
        ``x`` of shape (N, n, ...) and ``y`` of shape (N, n); client ``c`` owns ``x[c], y[c]``.

    Raises:
        RuntimeError: when a checksum differs (the data would not be the specified workload).
    """
    g = torch.Generator().manual_seed(0)
    if w.name == "w1":
        x = torch.randn((w.num_clients, w.samples, 64), generator=g)
        w_true = torch.randn((64, 10), generator=g)
        y = torch.argmax(x @ w_true, -1)
    else:
        x = torch.randn((w.num_clients, w.samples, 3, 32, 32), generator=g)
        y = torch.randint(0, 10, (w.num_clients, w.samples), generator=g)
    sx, sy = x.double().sum().item(), int(y.sum().item())
    if abs(sx - w.sum_x) > _CHECKSUM_TOL or sy != w.sum_y:
        raise RuntimeError(
            f"{w.name}: checksum mismatch: sum(x)={sx:.6f} (want {w.sum_x}), sum(y)={sy} (want {w.sum_y})"
        )
    return x, y


def initial_model(w: Workload) -> nn.Module:
    """The round-0 global model: ``torch.manual_seed(0)`` then PyTorch's default initialisation."""
    torch.manual_seed(0)
    return build_model(w.model, num_classes=10, **w.model_kwargs)


class ReferenceSampler:
    """The reference cohort stream: one ``random.Random(0)``, ``sorted(rng.sample(range(N), K))`` per round.

    The stream advances once per round in round order; draws are cached so that asking for a round twice (or
    from every rank) returns the same cohort. Call signature matches ``Simulator(cohort_sampler=...)``.
    """

    def __init__(self, num_clients: int, cohort: int) -> None:
        self._rng = random.Random(0)
        self._n, self._k = num_clients, cohort
        self._draws: list[list[int]] = []

    def __call__(self, seed: int, round: int, num_clients: int, clients_per_round: int) -> list[int]:
        if (num_clients, clients_per_round) != (self._n, self._k):
            raise ValueError(
                f"sampler built for N={self._n}, K={self._k}, asked N={num_clients}, K={clients_per_round}"
            )
        while len(self._draws) < round:
            self._draws.append(sorted(self._rng.sample(range(self._n), self._k)))
        return self._draws[round - 1]


def permutation_seed(seed: int, round: int, client_id: int) -> int:
    """The reference seed of client ``c``'s sample order in round ``r``: ``1_000_003 * r + c``."""
    return 1_000_003 * round + client_id


class PlainLoop:
    """FedAvg as a plain PyTorch loop: one model, ``copy_`` of the global weights per client, fresh SGD."""

    def __init__(self, w: Workload, x: Tensor, y: Tensor, model: nn.Module) -> None:
        self.w, self.x, self.y, self.model = w, x, y, model
        self.model.train()
        self.names = [k for k, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.global_weights = [p.detach().clone() for p in self.params]
        self.sampler = ReferenceSampler(w.num_clients, w.cohort)

    def _train_client(self, round: int, c: int) -> None:
        with torch.no_grad():
            for p, g in zip(self.params, self.global_weights):
                p.copy_(g)
        opt = torch.optim.SGD(self.params, lr=self.w.lr, momentum=self.w.momentum)
        order = torch.randperm(self.w.samples, generator=torch.Generator().manual_seed(permutation_seed(0, round, c)))
        xc, yc = self.x[c], self.y[c]
        for start in range(0, self.w.samples, self.w.batch_size):
            idx = order[start : start + self.w.batch_size]
            loss = F.cross_entropy(self.model(xc[idx]), yc[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def run_round(self, round: int) -> None:
        """Samples the cohort, trains each client and sets ``global = sum_k n_k w_k / sum_k n_k``."""
        acc = [torch.zeros_like(g) for g in self.global_weights]
        total = 0
        for c in self.sampler(0, round, self.w.num_clients, self.w.cohort):
            self._train_client(round, c)
            n_k = int(self.y[c].numel())
            with torch.no_grad():
                for a, p in zip(acc, self.params):
                    a.add_(p, alpha=n_k)
            total += n_k
        self.global_weights = [a / total for a in acc]

    def global_state(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.global_weights))


def build_simulator(fabric: Any, w: Workload, x: Tensor, y: Tensor, rounds: int, exact: bool = True,
                    vectorized: bool = False) -> Simulator:
    """fedlt's engine on the same data, model, sampler and permutations (set up, not yet run); ``exact``: the
    exact, world-size-invariant reduction (the default) or the float sum; ``vectorized``: the cohort's clients
    trained together (``trainer.vectorize_cohort``)."""
    flat_x, flat_y = x.reshape(-1, *x.shape[2:]), y.reshape(-1)
    indices = [torch.arange(c * w.samples, (c + 1) * w.samples) for c in range(w.num_clients)]
    data = FederatedDataset.from_tensors(flat_x, flat_y, flat_x[: w.samples], flat_y[: w.samples], indices, 10)
    method = FedAvg(lr=w.lr, momentum=w.momentum, batch_size=w.batch_size, local_epochs=1)
    sim = Simulator(
        fabric, data, initial_model(w), method, rounds=rounds, clients_per_round=w.cohort, eval_every=0,
        cohort_sampler=ReferenceSampler(w.num_clients, w.cohort), client_seed_fn=permutation_seed,
        exact_reduction=exact, vectorize_cohort=vectorized,
    )
    return sim.setup()


# -- process helpers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` intra-op threads (DDP ranks get fewer; the plain loop uses the default)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _process_wall_s() -> float:
    """Seconds since this process started (interpreter start and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


def _summary(times: Sequence[float]) -> dict[str, Any]:
    timed = list(times[WARMUP_ROUNDS:])
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "first": times[0],
            "rounds": list(times)}


class Bench:
    """Runs both implementations on one workload over the ranks of ``fabric`` (rank 0 reports)."""

    def __init__(self, fabric: Any, w: Workload, default_threads: int, profile: str | None = None) -> None:
        self.fabric, self.w, self.default_threads, self.profile = fabric, w, default_threads, profile
        self.rank = fabric.global_rank
        self.x, self.y = make_data(w)
        self.cold: dict[str, float] = {}  # first round of each side in this process (the check's round 1)

    def _barrier(self) -> None:
        if self.fabric.world_size > 1:
            self.fabric.barrier()

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` single-process on rank 0 with the default thread count; the other ranks wait."""
        out = None
        if self.rank == 0:
            with _threads(self.default_threads):
                out = fn()
        self._barrier()
        return out

    def _time(self, run_round: Callable[[int], Any], rounds: int, sync: bool = True) -> list[float]:
        """Per-round wall times; with ``sync`` every round starts right after a barrier (fedlt over ranks)."""
        times, self.last_cpu = [], []
        for r in range(1, rounds + 1):
            if sync:
                self._barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run_round(r)
            times.append(time.perf_counter() - t0)
            self.last_cpu.append(time.process_time() - c0)  # this process's CPU time: robust to other load
        return times

    def check(self) -> float:
        """Max abs difference of the global weights after 3 reference rounds (the same value on every rank)."""
        def plain() -> dict[str, Tensor]:
            loop = PlainLoop(self.w, self.x, self.y, initial_model(self.w))
            self.cold["plain"] = self._time(loop.run_round, CHECK_ROUNDS, sync=False)[0]
            return loop.global_state()

        ref = self._on_rank0(plain)
        sim = build_simulator(self.fabric, self.w, self.x, self.y, CHECK_ROUNDS)
        self.cold["fedlt"] = self._time(sim.run_round, CHECK_ROUNDS)[0]
        diff = torch.zeros(1)
        if ref is not None:
            diff[0] = max(float((sim.global_state[k] - v).abs().max()) for k, v in ref.items())
        if self.fabric.world_size > 1:
            diff = self.fabric.broadcast(diff, src=0)
        return float(diff[0])

    def run_pass(self) -> tuple[list[float] | None, list[float], float]:
        """One plain run then one fedlt run of warm-up + timed rounds; returns (plain, fedlt, fedlt start-up)."""
        rounds = WARMUP_ROUNDS + TIMED_ROUNDS
        loop = PlainLoop(self.w, self.x, self.y, initial_model(self.w)) if self.rank == 0 else None
        plain = self._on_rank0(lambda: self._time(loop.run_round, rounds, sync=False))
        t0 = time.perf_counter()
        sim = build_simulator(self.fabric, self.w, self.x, self.y, rounds)
        startup = time.perf_counter() - t0
        fedlt = self._time(sim.run_round, rounds)
        self.fedlt_cpu = list(self.last_cpu)
        return plain, fedlt, startup

    def run_vectorized_pass(self) -> list[float]:
        """One fedlt run with vectorized cohorts (the same rounds, clients trained together)."""
        sim = build_simulator(self.fabric, self.w, self.x, self.y, WARMUP_ROUNDS + TIMED_ROUNDS, vectorized=True)
        return self._time(sim.run_round, WARMUP_ROUNDS + TIMED_ROUNDS)

    def check_vectorized(self) -> float:
        """Max abs difference between vectorized and sequential fedlt after the check's rounds."""
        a = build_simulator(self.fabric, self.w, self.x, self.y, CHECK_ROUNDS)
        b = build_simulator(self.fabric, self.w, self.x, self.y, CHECK_ROUNDS, vectorized=True)
        for r in range(1, CHECK_ROUNDS + 1):
            a.run_round(r)
            b.run_round(r)
        return max(float((a.global_state[k] - v).abs().max()) for k, v in b.global_state.items())

    def run_float_pass(self) -> list[float]:
        """One fedlt run with the float (order-dependent) reduction, for the cost of the exact one."""
        sim = build_simulator(self.fabric, self.w, self.x, self.y, WARMUP_ROUNDS + TIMED_ROUNDS, exact=False)
        return self._time(sim.run_round, WARMUP_ROUNDS + TIMED_ROUNDS)

    def profile_fedlt(self) -> None:
        """An extra, untimed fedlt run with cProfile over its post-warm-up rounds (on rank 0)."""
        sim = build_simulator(self.fabric, self.w, self.x, self.y, WARMUP_ROUNDS + TIMED_ROUNDS)
        self._time(sim.run_round, WARMUP_ROUNDS)
        prof = cProfile.Profile()
        if self.rank == 0:
            prof.enable()
        self._time(lambda r: sim.run_round(r + WARMUP_ROUNDS), TIMED_ROUNDS)
        prof.disable()
        if self.rank == 0:
            self._report_profile(prof)

    def _report_profile(self, prof: cProfile.Profile) -> None:
        prof.dump_stats(f"{self.profile}.{self.w.name}")
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(25)
            print(f"--- fedlt {self.w.name}: {TIMED_ROUNDS} profiled rounds, top 25 by {key} ---")
            print(buf.getvalue().split("\n", 4)[-1].rstrip())

    def peak_rss(self) -> list[float]:
        """Peak RSS (MB) of every rank."""
        rss = torch.zeros(self.fabric.world_size, dtype=torch.float64)
        rss[self.rank] = _peak_rss_mb()
        if self.fabric.world_size > 1:
            rss = self.fabric.all_reduce(rss, reduce_op="sum")
        return rss.tolist()


def bench_workload(fabric: Any, w: Workload, passes: int, default_threads: int, profile: str | None,
                   float_too: bool = False, vectorized: bool = False) -> dict[str, Any]:
    """Correctness check, then ``passes`` alternating plain / fedlt passes (and fedlt with the float reduction
    with ``float_too``); raises SystemExit(1) on a bad check."""
    bench = Bench(fabric, w, default_threads, profile)
    diff = bench.check()
    _say(fabric, f"{w.name}: check after {CHECK_ROUNDS} rounds: max |fedlt - plain| = {diff:.3e} "
                 f"({'ok' if diff <= CHECK_TOL else 'FAILED'}, tolerance {CHECK_TOL:g})")
    if not diff <= CHECK_TOL:
        raise SystemExit(1)
    result: dict[str, Any] = {"check_max_abs_diff": diff, "cold_first_round_s": bench.cold, "passes": []}
    if vectorized:
        result["vectorized_check_max_abs_diff"] = bench.check_vectorized()
        _say(fabric, f"{w.name}: vectorized vs sequential fedlt after {CHECK_ROUNDS} rounds: max abs difference "
                     f"{result['vectorized_check_max_abs_diff']:.3e}")
    for _ in range(passes):
        plain, fed, startup = bench.run_pass()
        if plain is None:
            continue
        ps, fs = _summary(plain), _summary(fed)
        result["passes"].append({"plain": ps, "fedlt": fs, "ratio": fs["median"] / ps["median"],
                                 "fedlt_startup_s": startup})
        if float_too:
            fl = _summary(bench.run_float_pass())
            cpu_exact, cpu_float = _summary(bench.fedlt_cpu), _summary(bench.last_cpu)
            result["passes"][-1].update(fedlt_float=fl, exact_vs_float=fs["median"] / fl["median"],
                                        cpu_exact=cpu_exact, cpu_float=cpu_float,
                                        exact_vs_float_cpu=cpu_exact["median"] / cpu_float["median"])
        if vectorized:
            vec = _summary(bench.run_vectorized_pass())
            cpu_vec = _summary(bench.last_cpu)
            result["passes"][-1].update(fedlt_vectorized=vec, vectorized_vs_plain=vec["median"] / ps["median"],
                                        cpu_vectorized=cpu_vec)
    if profile:
        bench.profile_fedlt()
    result["peak_rss_mb_per_rank"] = bench.peak_rss()
    _medians(result)
    return result


def _medians(result: dict[str, Any]) -> None:
    """The medians over passes of every per-pass ratio the passes hold."""
    passes = result["passes"]
    if not passes:
        return
    result["ratio_median"] = statistics.median(p["ratio"] for p in passes)
    for key in ("exact_vs_float", "exact_vs_float_cpu", "vectorized_vs_plain"):
        if key in passes[0]:
            result[f"{key}_median"] = statistics.median(p[key] for p in passes)


# -- reporting ----------------------------------------------------------------------------------------------
def _say(fabric: Any, msg: str) -> None:
    if fabric.global_rank == 0:
        print(msg, flush=True)


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['median'] * 1e3:9.1f} [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"


def print_table(name: str, res: dict[str, Any], devices: int) -> None:
    """Per-pass medians [min-max] in ms, the ratio per pass and its median, cold start and memory."""
    print(f"\n{name}  (median [min-max] of {TIMED_ROUNDS} rounds after {WARMUP_ROUNDS} warm-up, ms; "
          f"fedlt on {devices} process(es))")
    print(f"{'pass':>4}  {'plain loop':>28}  {'fedlt':>28}  {'fedlt/plain':>11}")
    for i, p in enumerate(res["passes"], 1):
        print(f"{i:>4}  {_fmt(p['plain']):>28}  {_fmt(p['fedlt']):>28}  {p['ratio']:>11.3f}")
    ratios = [p["ratio"] for p in res["passes"]]
    print(f"ratio fedlt/plain: median {res['ratio_median']:.3f} over {len(ratios)} passes "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]")
    if "exact_vs_float_median" in res:
        per = ", ".join(f"{p['exact_vs_float']:.3f}" for p in res["passes"])
        floats = ", ".join(_fmt(p["fedlt_float"]).strip() for p in res["passes"])
        print(f"fedlt with the float reduction per pass: {floats}; exact/float: median "
              f"{res['exact_vs_float_median']:.3f} ({per})")
        cpu = ", ".join(f"{p['exact_vs_float_cpu']:.3f}" for p in res["passes"])
        print(f"exact/float in process CPU time per round: median {res['exact_vs_float_cpu_median']:.3f} ({cpu})")
    if "vectorized_vs_plain_median" in res:
        per = ", ".join(f"{p['vectorized_vs_plain']:.3f}" for p in res["passes"])
        print(f"fedlt with vectorized cohorts / plain loop: median {res['vectorized_vs_plain_median']:.3f} ({per})")
    cold, setup = res["cold_first_round_s"], res["passes"][0]["fedlt_startup_s"]
    print(f"cold start: first round in this process plain {cold['plain'] * 1e3:.1f} ms, fedlt "
          f"{cold['fedlt'] * 1e3:.1f} ms; fedlt data+Simulator setup {setup * 1e3:.1f} ms")
    rss = res["peak_rss_mb_per_rank"]
    extra = f" (sum over {len(rss)} ranks {sum(rss):.0f} MB)" if len(rss) > 1 else ""
    print(f"peak RSS so far (ru_maxrss, rank 0): {rss[0]:.0f} MB{extra}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--workload", choices=["w1", "w2", "all"], default="all")
    ap.add_argument("--passes", type=int, default=2, help="alternating plain/fedlt passes (default 2)")
    ap.add_argument("--devices", type=int, default=1, help="fedlt processes; >1 uses Fabric DDP on CPU")
    ap.add_argument("--check", action="store_true", help="only run the correctness check")
    ap.add_argument("--float-reduction", action="store_true",
                    help="also time fedlt with trainer.exact_reduction false in every pass (the exact sums' cost)")
    ap.add_argument("--vectorized", action="store_true",
                    help="also time fedlt with trainer.vectorize_cohort true in every pass")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="after the passes, cProfile one extra fedlt run (not in the ratios) into PREFIX.<workload>")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 when a correctness check fails)."""
    args = _parse(argv)
    from lightning.fabric import Fabric

    default_threads = torch.get_num_threads()  # before the DDP launcher lowers it per rank
    t0 = time.perf_counter()
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    launch_s = time.perf_counter() - t0
    names = ["w1", "w2"] if args.workload == "all" else [args.workload]
    out: dict[str, Any] = {"devices": args.devices, "threads_plain": default_threads,
                           "threads_fedlt": torch.get_num_threads(), "fabric_launch_s": launch_s, "workloads": {}}
    _say(fabric, f"fedlt round overhead: devices={args.devices}, torch threads plain={default_threads} "
                 f"fedlt={torch.get_num_threads()}, Fabric launch {launch_s * 1e3:.0f} ms")
    for name in names:
        w = WORKLOADS[name]
        if args.check:
            diff = Bench(fabric, w, default_threads).check()
            _say(fabric, f"{name}: check after {CHECK_ROUNDS} rounds: max |fedlt - plain| = {diff:.3e}")
            out["workloads"][name] = {"check_max_abs_diff": diff}
            if not diff <= CHECK_TOL:
                return 1
            continue
        res = bench_workload(fabric, w, args.passes, default_threads, args.profile, args.float_reduction,
                             args.vectorized)
        out["workloads"][name] = res
        if fabric.global_rank == 0:
            print_table(name, res, args.devices)
    out["process_wall_s"] = _process_wall_s()
    _say(fabric, f"\nprocess wall time {out['process_wall_s']:.1f} s (interpreter start to end, rank 0)")
    if args.json and fabric.global_rank == 0:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
