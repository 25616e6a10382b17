"""The documentation site: the method pages are current, and ``mkdocs build --strict`` passes (no broken link,
no docstring mkdocstrings cannot read, no page missing from the site)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_has_a_current_page():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_method_pages
    finally:
        sys.path.pop(0)
    from fedlt.methods import METHODS

    pages = gen_method_pages.pages()
    assert {p.stem for p in pages} == {*METHODS.names(), "index"}
    stale = [str(p.relative_to(ROOT)) for p, text in pages.items() if not p.is_file() or p.read_text() != text]
    assert not stale, f"stale method pages, run python docs/gen_method_pages.py: {stale}"
    index = pages[ROOT / "docs" / "methods" / "index.md"]
    assert all(f"]({name}.md)" in index for name in METHODS.names())


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "concepts/index.html", "howto/add-a-method/index.html", "methods/fedloge/index.html",
                 "api/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "experiment_from_argv" in api and "current_lr" in api  # mkdocstrings rendered the docstrings
