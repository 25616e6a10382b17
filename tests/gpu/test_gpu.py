"""GPU checks (``-m gpu``; skipped without CUDA): a CUDA fit of the quick-start in each precision, a 2-GPU NCCL
world-size check, and idle clients costing no GPU memory. ``benchmarks/gpu_check.sh`` runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _fit(run: Path, *extra: str) -> dict:
    from fedlt.cli import main

    code = main(["fit", "--config", QUICKSTART, "--run_dir", str(run), "--trainer.accelerator", "cuda",
                 "--trainer.rounds", "6", "--logging.wandb", "false", "--logging.progress_bar", "false", *extra])
    assert code in (0, None)
    return json.loads((run / "final.json").read_text())


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_quickstart_fits_on_cuda(tmp_path, precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    report = _fit(tmp_path / precision, "--trainer.precision", precision)
    gm = report["final"]["test/global/acc"]
    pm = report["final"]["test/personal/acc_mean"]
    assert 0.2 < gm <= 1.0 and 0.2 < pm <= 1.0, (gm, pm)  # chance is 0.1; six rounds learn the head classes


def test_auto_defaults_use_the_gpus_and_record_what_ran(tmp_path):
    """No --trainer.accelerator: ``auto`` trains on the GPUs; config.yaml records cuda, the device count and the
    precision ``auto`` chose (bf16-mixed on compute capability 8.0 and newer)."""
    import yaml

    from fedlt.cli import main

    run = tmp_path / "auto"
    assert main(["fit", "--config", QUICKSTART, "--run_dir", str(run), "--trainer.rounds", "2", "--trainer.devices",
                 "1", "--logging.wandb", "false", "--logging.progress_bar", "false"]) in (0, None)
    trainer = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    major = torch.cuda.get_device_capability(0)[0]
    assert trainer["accelerator"] == "cuda" and trainer["devices"] == 1
    assert trainer["precision"] == ("bf16-mixed" if major >= 8 else "32-true")
    env = json.loads((run / "environment.json").read_text())
    assert env["devices"]["type"] == "cuda" and env["precision"] == trainer["precision"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_what_one_does(tmp_path):
    """NCCL with two ranks against one rank: the same clients and cohorts, the same global model up to the GPU's
    float rounding (the exact reduction is order-free; cuDNN kernels are not bitwise reproducible)."""
    runs = {}
    for devices in (1, 2):
        run = tmp_path / f"d{devices}"
        env = {**os.environ, "WANDB_MODE": "offline"}
        proc = subprocess.run([sys.executable, "-m", "fedlt", "fit", "--config", QUICKSTART, "--run_dir", str(run),
                               "--trainer.accelerator", "cuda", "--trainer.devices", str(devices),
                               "--trainer.rounds", "3", "--logging.wandb", "false",
                               "--logging.progress_bar", "false"], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        ckpt = torch.load(run / "checkpoints" / "round_00003.ckpt", map_location="cpu", weights_only=False)
        runs[devices] = ckpt["simulator"]["reducer"]["global"]
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[2][key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_idle_clients_hold_no_gpu_memory(tmp_path):
    """A personalized method's client states live on the host (``client_state: cpu``): storing a head for each of
    2,000 clients, and a round that loads and stores some of them, leave the GPU memory where it was."""
    from fedlt.cli import build, make_experiment

    k = 2000
    argv = ["--config", QUICKSTART, "--run_dir", str(tmp_path / "run"), "--trainer.accelerator", "cuda",
            "--method", "FedPer", "--trainer.client_state", "cpu", "--data.num_clients", str(k),
            "--data.source.init_args.train_per_class", str(k), "--data.imbalance_factor", "1",
            "--data.partition", "IID", "--logging.wandb", "false"]
    parser, cfg, init = build("fit", argv)
    sim = make_experiment(parser, cfg, init).build_simulator()
    sim.run_round(1)  # the workspace, optimizer and reducer buffers exist now
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    head = {"model." + n: v for n, v in sim._default_personal.items()}
    for c in range(k):  # every client has a stored head, as after a long run
        sim.store.put(c, head)
    sim.run_round(2)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # 0 bytes per idle client
    assert all(v.device.type == "cpu" for s in sim.store.states().values() for v in s.values())
