"""Start-up time of the CLI's cheap paths against ``python -c "import torch"`` on the same machine.

Each command runs ``--repeats`` times in a fresh interpreter; the table gives the median wall time and the median
CPU time of the child process (user + system, robust to other load on the machine), and each ratio to the
``import torch`` baseline measured in the same way, interleaved with the commands.

    python benchmarks/startup.py               # 5 repeats
    python benchmarks/startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "fedlt --help": [sys.executable, "-m", "fedlt", "--help"],
    "fedlt methods": [sys.executable, "-m", "fedlt", "methods"],
    "fedlt fit --help": [sys.executable, "-m", "fedlt", "fit", "--help"],
    "fedlt fit --config missing.yaml (exit 2)": [sys.executable, "-m", "fedlt", "fit", "--config", "missing.yaml"],
}


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    run_once(COMMANDS['python -c "import torch"'])  # warm the file cache once
    for _ in range(a.repeats):  # interleaved, so that drifting load touches every command alike
        for name, cmd in COMMANDS.items():
            times[name].append(run_once(cmd))
    base_wall = statistics.median(w for w, _ in times['python -c "import torch"'])
    base_cpu = statistics.median(c for _, c in times['python -c "import torch"'])
    print(f"load average {os.getloadavg()[0]:.2f}, {a.repeats} repeats, medians")
    print("| command | wall (s) | wall / import torch | CPU (s) | CPU / import torch |")
    print("|---|---|---|---|---|")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {name} | {wall:.2f} | {wall / base_wall:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
