"""Shared fixtures. Tests never touch the network: W&B is offline and the HF hub is off."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


def pytest_configure(config):
    """Runs default to every visible GPU (``trainer.accelerator: auto``); the suite stays on the CPU unless the
    ``gpu``-marked tests are selected (``pytest -m gpu``), so that it gives the same results on any machine."""
    marks = config.getoption("-m") or ""
    if "gpu" not in marks.replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


import torch  # noqa: E402

# The machine CI runs on has 2 cores; an explicit OMP_NUM_THREADS wins (the DDP worker processes inherit it, so
# in-process references and workers use the same thread count).
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """One digits cache per test session (built once, reused), never the user's home."""
    cache = tmp_path_factory.getbasetemp() / "fedlt-cache"
    monkeypatch.setenv("FEDLT_CACHE", str(cache))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp() / "wandb"))
