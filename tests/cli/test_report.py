"""``fedlt report``: synthetic run directories with known numbers (tables, reduce modes, plots, errors) and a
real sweep of tiny fits (clients.json, auto-detected columns, every plot)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from fedlt.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
PNG = b"\x89PNG\r\n\x1a\n"

# (method, alpha, seed) -> v. A run's test/global/acc: round 1 = v + 0.2 (the best), round 2 = 0, rounds 3..11 = v,
# round 12 = v + 0.1 (the last), round 13 has no evaluation. So last10 = v + 0.01, last = v + 0.1, best = v + 0.2.
V = {("FedAvg", 0.5, 0): 0.60, ("FedAvg", 0.5, 1): 0.62, ("FedProx", 0.5, 0): 0.70, ("FedProx", 0.5, 1): 0.74,
     ("FedAvg", 1.0, 0): 0.80, ("FedAvg", 1.0, 1): 0.80, ("FedProx", 1.0, 0): 0.50}
GROUP_OFFSET = {"many": 0.1, "medium": 0.0, "few": -0.2}


def _curve(v: float) -> list[float]:
    return [v + 0.2, 0.0, *[v] * 9, v + 0.1]


def _write_run(run: Path, method: str, alpha: float, seed: int, v: float, clients: bool = True,
               finished: bool = True) -> None:
    run.mkdir(parents=True)
    init = {"lr": 0.05, **({"mu": 0.01} if method == "FedProx" else {})}
    config = {"seed": seed, "name": run.name, "run_dir": str(run),
              "data": {"imbalance_factor": 100.0,
                       "partition": {"class_path": "fedlt.data.Dirichlet", "init_args": {"alpha": alpha}}},
              "method": {"class_path": f"fedlt.methods.{method}", "init_args": init},
              "trainer": {"rounds": 13, "accelerator": "cpu" if seed else "cuda"},
              "logging": {"wandb": False, "group": f"g{seed}"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    keys = ["test/global/acc", *(f"test/global/acc_{g}" for g in GROUP_OFFSET), "train/loss"]
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", *keys])
        for r, acc in enumerate(_curve(v), start=1):
            w.writerow([r, repr(acc), *(repr(acc + o) for o in GROUP_OFFSET.values()), 1.0 / r])
        w.writerow([13, "", "", "", "", 1.0 / 13])
    if finished:
        (run / "final.json").write_text("{}")
    if clients:
        (run / "clients.json").write_text(json.dumps({"acc": [v - 0.1, v, v + 0.1, None], "num_test": [5, 5, 5, 0]}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for (method, alpha, seed), v in V.items():
        _write_run(root / "runs" / f"{method}-a{alpha}-s{seed}", method, alpha, seed, v)
    return root


def _report(*args: str) -> int:
    return main(["report", *map(str, args)])


def test_table_values_and_auto_columns(sweep, capsys):
    assert _report(sweep) == 0
    out = capsys.readouterr().out
    s = json.loads((sweep / "report" / "summary.json").read_text())
    assert s["column_keys"] == ["data.partition.init_args.alpha"]  # not seed/name/logging/accelerator/mu
    assert s["rows"] == ["FedAvg", "FedProx"] and s["columns"] == ["alpha=0.5", "alpha=1"]
    cell = s["cells"]["FedAvg"]["alpha=0.5"]
    assert cell["mean"] == pytest.approx(0.62) and cell["std"] == pytest.approx(0.02 ** 0.5 / 10) and cell["n"] == 2
    assert sorted(cell["seeds"]) == [0, 1] and cell["values"] == pytest.approx([0.61, 0.63])
    assert s["cells"]["FedProx"]["alpha=0.5"]["mean"] == pytest.approx(0.73)
    one = s["cells"]["FedProx"]["alpha=1"]
    assert (one["mean"], one["std"], one["n"], one["seeds"]) == (pytest.approx(0.51), 0.0, 1, [0])
    assert s["best"] == {"alpha=0.5": ["FedProx"], "alpha=1": ["FedAvg"]} and s["num_runs"] == 7
    g = s["groups"]["cells"]["alpha=0.5"]["FedAvg"]
    assert [g[k]["mean"] for k in ("many", "medium", "few")] == pytest.approx([0.72, 0.62, 0.42])
    md = (sweep / "report" / "table.md").read_text()
    assert md.splitlines()[:4] == [
        "| method | alpha=0.5 | alpha=1 |",
        "|:---|---:|---:|",
        "| FedAvg | 62.00 ± 1.41 (n=2) | **81.00 ± 0.00** (n=2) |",
        "| FedProx | **73.00 ± 2.83** (n=2) | 51.00 (n=1) |",  # a single run: its value, no "± 0.00"
    ]
    assert "GM accuracy (%) (test/global/acc): mean ± sample std over seeds, n runs per cell" in md
    assert "mean of the last 10 evaluated rounds;" in md  # 12 evaluated rounds: 10 averaged, as asked
    assert md in out and f"wrote {sweep / 'report' / 'table.tex'}" in out


def test_latex_table_is_escaped_and_matches(sweep, tmp_path):
    out = tmp_path / "out"
    assert _report(sweep, "--columns", "data.partition.init_args.alpha,data.imbalance_factor", "--out", out,
                   "--title", "IF_100 & 5% (a#1)") == 0
    tex = (out / "table.tex").read_text()
    lines = tex.splitlines()
    assert lines[0] == r"% IF\_100 \& 5\% (a\#1)"
    assert lines[2] == r"\begin{tabular}{lcc}" and lines[3] == r"\toprule" and lines[-2] == r"\end{tabular}"
    assert lines[-1] == "% Software: not recorded"  # these hand-written runs have no environment.json
    assert lines[4] == r"method & alpha=0.5, imbalance\_factor=100 & alpha=1, imbalance\_factor=100 \\"
    assert lines[5] == r"\midrule" and lines[-3] == r"\bottomrule"
    assert lines[6] == r"FedAvg & $62.00 \pm 1.41$ {\scriptsize (2)} & $\mathbf{81.00 \pm 0.00}$ {\scriptsize (2)} \\"
    assert lines[7] == r"FedProx & $\mathbf{73.00 \pm 2.83}$ {\scriptsize (2)} & $51.00$ {\scriptsize (1)} \\"
    body = "\n".join(line.removeprefix("% ") for line in lines).replace(" & ", " ").replace("\\\\", "")
    assert not re.search(r"(?<!\\)[_&%#]", body)  # every special character escaped
    md = (out / "table.md").read_text()
    assert md.startswith("**IF_100 & 5% (a#1)**\n") and "| FedAvg | 62.00 ± 1.41 (n=2) | **81.00 ± 0.00** (n=2) |" in md


@pytest.mark.parametrize(("mode", "mean"),
                         [("last10", 0.62), ("last", 0.71), ("best", 0.81), ("last3", 0.61 + 0.1 / 3)])
def test_reduce_modes(sweep, mode, mean):
    assert _report(sweep, "--reduce", mode) == 0
    s = json.loads((sweep / "report" / "summary.json").read_text())
    assert s["reduce"] == mode and s["cells"]["FedAvg"]["alpha=0.5"]["mean"] == pytest.approx(mean)


def test_best_of_a_loss_is_its_minimum(sweep):
    assert _report(sweep, "--metric", "train/loss", "--reduce", "best") == 0
    s = json.loads((sweep / "report" / "summary.json").read_text())
    assert s["cells"]["FedAvg"]["alpha=0.5"]["mean"] == pytest.approx(1.0 / 13)  # train/loss = 1 / round


def test_rows_and_columns_options(sweep):
    assert _report(sweep, "--columns", "none", "--metric", "train/loss") == 0
    s = json.loads((sweep / "report" / "summary.json").read_text())
    assert s["columns"] == ["train/loss"] and not s["percent"] and not s["higher_is_better"]
    assert s["cells"]["FedAvg"]["train/loss"]["n"] == 4
    assert s["cells"]["FedAvg"]["train/loss"]["mean"] == pytest.approx(sum(1 / r for r in range(4, 14)) / 10)
    assert _report(sweep, "--rows", "data.partition.init_args.alpha", "--columns", "method") == 0
    s = json.loads((sweep / "report" / "summary.json").read_text())
    assert s["rows"] == ["0.5", "1"] and s["columns"] == ["method=FedAvg", "method=FedProx"]
    assert s["cells"]["1"]["method=FedProx"]["mean"] == pytest.approx(0.51)


def test_plots_are_pngs_with_the_table_numbers(sweep):
    assert _report(sweep) == 0
    out = sweep / "report"
    for name in ("accuracy_vs_round", "groups", "pm_clients"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    plots = json.loads((out / "summary.json").read_text())["plots"]
    curves = plots["accuracy_vs_round"]["panels"]
    assert [p["title"] for p in curves] == ["alpha=0.5", "alpha=1"]
    line = curves[0]["series"]["FedAvg (n=2)"]
    assert [x for x, _ in line] == list(range(1, 13)) and line[-1][1] == pytest.approx(100 * 0.71)
    assert set(curves[1]["series"]) == {"FedAvg (n=2)", "FedProx (n=1)"}
    bars = plots["groups"]["panels"][0]  # many (FedAvg, FedProx), medium (...), few (...)
    assert bars["rows"] == ["FedAvg", "FedProx"]
    assert bars["bars"] == pytest.approx([72.0, 83.0, 62.0, 73.0, 42.0, 53.0])
    pm = plots["pm_clients"]["panels"][0]
    assert pm["num_clients"] == [6, 6] and pm["medians"] == pytest.approx([61.0, 72.0])


def test_missing_clients_json_skips_the_pm_plot_and_unfinished_runs(tmp_path, capsys):
    _write_run(tmp_path / "a", "FedAvg", 0.5, 0, 0.6, clients=False)
    _write_run(tmp_path / "b", "FedAvg", 0.5, 1, 0.7, clients=False, finished=False)
    assert _report(tmp_path) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert not (tmp_path / "report" / "pm_clients.png").exists() and "pm_clients.png skipped" in out
    assert s["num_runs"] == 1 and "not in the table: 1 unfinished run(s) without final.json" in out
    assert "(--unfinished keeps them): b" in (tmp_path / "report" / "table.md").read_text()  # named, in the table
    assert _report(tmp_path, "--unfinished") == 0
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert s["num_runs"] == 2 and s["cells"]["FedAvg"]["test/global/acc"]["mean"] == pytest.approx(0.66)


def test_runs_with_a_post_training_stage_are_named(tmp_path, capsys):
    _write_run(tmp_path / "a", "FedLoGe", 0.5, 0, 0.6)
    (tmp_path / "a" / "final.json").write_text(json.dumps({"post_training": {"test/global/acc": 0.7}}))
    _write_run(tmp_path / "b", "FedLoGe", 0.5, 1, 0.7)
    assert _report(tmp_path) == 0
    assert "1 run(s) have a post-training evaluation" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{root}/nope"], "no such directory"),
        (["{root}/empty"], "no run directories"),
        (["{root}/sweep", "--metric", "test/global/accc"], "unknown metric 'test/global/accc'"),
        (["{root}/sweep", "--rows", "data.alpha"], "--rows: unknown config key 'data.alpha'"),
        (["{root}/sweep", "--columns", "data.imbalance_factr"], "did you mean data.imbalance_factor"),
        (["{root}/sweep", "--reduce", "median"], "--reduce 'median'"),
        (["{root}/sweep", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required: RUN_OR_SWEEP_DIR"),
    ],
)
def test_bad_input_exits_2(sweep, capsys, args, needle):
    (sweep.parent / "empty").mkdir()
    assert _report(*(a.format(root=sweep.parent) for a in args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlt: error:") and needle in err and "Traceback" not in err


def test_report_of_real_tiny_fits(tmp_path, capsys):
    """FedAvg / FedProx x 2 seeds through ``fedlt fit``: clients.json matches the PM metric, columns auto-detect."""
    root = tmp_path / "sweep" / "runs"
    for method, seed in (("FedAvg", 0), ("FedAvg", 1), ("FedProx", 0)):
        assert main(["fit", "--config", TINY, "--method", method, "--seed", str(seed), "--name", f"{method}-{seed}",
                     "--run_dir", str(root / f"{method}-{seed}")]) == 0
    run = root / "FedAvg-0"
    clients = json.loads((run / "clients.json").read_text())
    last = list(csv.DictReader((run / "metrics.csv").open()))[-1]
    accs = [a for a in clients["acc"] if a is not None]
    assert clients["round"] == 2 and len(clients["acc"]) == 8 and sum(clients["num_test"]) > 0
    assert sum(accs) / len(accs) == pytest.approx(float(last["test/personal/acc_mean"]), abs=1e-6)
    capsys.readouterr()
    assert _report(tmp_path / "sweep", "--reduce", "last") == 0
    s = json.loads((tmp_path / "sweep" / "report" / "summary.json").read_text())
    assert s["column_keys"] == [] and s["rows"] == ["FedAvg", "FedProx"]  # seed, name, FedProx's mu: not columns
    cell = s["cells"]["FedAvg"]["test/global/acc"]
    finals = [json.loads((root / f"FedAvg-{i}" / "final.json").read_text())["final"]["test/global/acc"] for i in (0, 1)]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(finals) / 2)
    assert set(s["plots"]) == {"accuracy_vs_round", "groups", "pm_clients"}
    evaluated = [sum(a is not None for a in json.loads((root / n / "clients.json").read_text())["acc"])
                 for n in ("FedAvg-0", "FedAvg-1", "FedProx-0")]
    assert s["plots"]["pm_clients"]["panels"][0]["num_clients"] == [evaluated[0] + evaluated[1], evaluated[2]]


@pytest.mark.ddp
@pytest.mark.slow
def test_clients_json_is_world_size_invariant(tmp_path):
    """Two processes shard the clients; the per-client PM accuracies (summed counts) match one process."""
    import subprocess
    import sys

    for name, devices in (("one", "1"), ("two", "2")):
        cmd = [sys.executable, "-m", "fedlt", "fit", "--config", TINY, "--run_dir", str(tmp_path / name),
               "--trainer.devices", devices]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (json.loads((tmp_path / n / "clients.json").read_text()) for n in ("one", "two"))
    assert one == two and len(one["acc"]) == 8


def test_csv_next_to_the_tables_and_captions_that_say_how_many_rounds_were_averaged(sweep, tmp_path):
    assert _report(sweep) == 0
    rows = list(csv.DictReader((sweep / "report" / "table.csv").open()))
    first = rows[0]
    assert (first["method"], first["column"], first["n"], first["best"]) == ("FedAvg", "alpha=0.5", "2", "0")
    assert float(first["mean"]) == pytest.approx(62.0) and float(first["std"]) == pytest.approx(1.41421, rel=1e-4)
    assert len(rows) == 4
    # 12 evaluated rounds and --reduce last20: all 12 averaged, and the caption says so.
    assert _report(sweep, "--reduce", "last20", "--out", tmp_path / "r20") == 0
    md = (tmp_path / "r20" / "table.md").read_text()
    assert "mean of the last 20 evaluated rounds asked; the runs have 12 evaluated rounds, all of them averaged" in md
    assert json.loads((tmp_path / "r20" / "summary.json").read_text())["rounds_used"] == [12, 12]


def test_metric_labels_in_words_with_units():
    from fedlt.cli.report_runs import metric_label

    assert metric_label("test/global/acc") == "GM accuracy (%)"
    assert metric_label("test/personal/acc_mean") == "PM mean accuracy over clients (%)"
    assert metric_label("test/global/acc_few") == "GM few-class accuracy (%)"
    assert metric_label("test/domain/sketch/acc") == "sketch domain accuracy (%)"
    assert metric_label("train/loss") == "train: loss"
    assert metric_label("time/round_s") == "time: seconds per round"


def test_a_sweeps_pending_and_interrupted_runs_are_listed(tmp_path):
    root = tmp_path / "sw"
    _write_run(root / "runs" / "done", "FedAvg", 0.5, 0, 0.6)
    _write_run(root / "runs" / "broken", "FedAvg", 0.5, 1, 0.6, finished=False)
    (root / "runs" / "broken" / "checkpoints").mkdir()
    (root / "runs" / "broken" / "checkpoints" / "round_00003.ckpt").write_bytes(b"x")
    spec = {"runs": [{"name": n, "config": f"configs/{n}.yaml", "rounds": 13} for n in ("done", "broken", "later")]}
    (root / "sweep.json").write_text(json.dumps(spec))
    assert _report(root) == 0
    md = (root / "report" / "table.md").read_text()
    assert "1 run(s) pending (never started): later" in md
    assert "1 run(s) interrupted (started, no result: failed, preempted or still running): broken" in md
