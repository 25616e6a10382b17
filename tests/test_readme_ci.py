"""The README's two setup commands: CI runs exactly the test command, and the main job's config exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quick start command block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_exactly_the_readmes_test_command():
    fit, test = _quick_start_commands()
    assert fit == "pip install -e . && fedlt fit --config configs/quickstart.yaml"
    assert (ROOT / "configs" / "quickstart.yaml").is_file()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, test  # the same line, character for character
    assert "ruff check ." in test and "&& mypy &&" in test and test.endswith("&& pytest")
