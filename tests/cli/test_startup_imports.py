"""The CLI's cheap paths (``--help``, ``fedlt methods``, a config error) import no heavy optional package: lightning,
torchmetrics, open_clip, timm, wandb, matplotlib and torchvision load only where a run uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("lightning", "torchmetrics", "open_clip", "timm", "wandb", "matplotlib", "torchvision")

PROBE = """
import contextlib, io, json, sys
from fedlt.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        code = main({argv!r})
    except SystemExit as e:
        code = e.code
print(json.dumps({{"code": code, "loaded": [m for m in {heavy!r} if m in sys.modules], "out": out.getvalue()}}))
"""


@pytest.mark.parametrize("argv,expected_code", [
    (["--help"], 0),
    (["methods"], 0),
    (["fit", "--help"], 0),
    (["fit", "--config", "/nonexistent/config.yaml"], 2),
], ids=["help", "methods", "fit-help", "missing-config"])
def test_cheap_cli_paths_import_no_heavy_package(argv, expected_code):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["code"] or 0) == expected_code, result["out"][-2000:]
    assert result["loaded"] == [], f"{argv}: imported {result['loaded']}"
    if argv == ["methods"]:
        assert "fedloge" in result["out"] and "fedpurel" in result["out"]
