"""``FedMethod.released_code`` (the arguments that select what the authors' released code did) is consistent with
the constructors, the paper-vs-code table in docs/paper_vs_code.md and the configs under configs/paper/."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

import fedlt.methods  # noqa: F401  (registers every method)
from fedlt.methods.base import METHODS

ROOT = Path(__file__).resolve().parents[2]
TABLE = (ROOT / "docs" / "paper_vs_code.md").read_text()
WITH_CODE = [(name, cls) for name, cls in METHODS.items() if cls.released_code]


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Constructor parameters of ``cls`` and of its bases (``**kwargs`` are forwarded up the chain)."""
    out: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in klass.__dict__:
            for p in inspect.signature(klass.__dict__["__init__"]).parameters.values():
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                    out[p.name] = p
    return out


def test_some_methods_declare_released_code():
    assert len(WITH_CODE) >= 1


@pytest.mark.parametrize("name,cls", WITH_CODE, ids=[n for n, _ in WITH_CODE])
def test_released_code_names_constructor_arguments_that_differ_from_the_default(name, cls):
    params = _parameters(cls)
    for arg, value in cls.released_code.items():
        assert arg in params, f"{cls.__name__}.released_code names {arg!r}, which is not a constructor argument"
        assert params[arg].default != value, f"{cls.__name__}.{arg}: the released-code value is the default"
    # The code's values are accepted together (some only make sense together, e.g. RedGrape's accumulation needs
    # the code's update rule).
    cls(**cls.released_code)


@pytest.mark.parametrize("name,cls", WITH_CODE, ids=[n for n, _ in WITH_CODE])
def test_every_difference_is_in_the_paper_vs_code_table(name, cls):
    rows = [line for line in TABLE.splitlines() if line.startswith("|") and cls.__name__ in line.split("|")[1]]
    assert rows, f"docs/paper_vs_code.md has no row for {cls.__name__}"
    for arg in cls.released_code:
        assert any(f"`{arg}" in row for row in rows), f"docs/paper_vs_code.md: no {cls.__name__} row for {arg!r}"


PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("config", PAPER, ids=lambda p: p.name)
def test_paper_configs_run_the_released_code(config):
    """A paper config sets every released-code argument of its method, unless its header names it as a
    remaining known difference."""
    text = config.read_text()
    cfg = yaml.safe_load(text)
    cls = METHODS.get(cfg["method"]["class_path"].rsplit(".", 1)[-1].lower())
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    args = cfg["method"].get("init_args") or {}
    for arg, value in cls.released_code.items():
        if arg in header:
            continue
        assert arg in args and args[arg] == value, f"{config.name}: {arg} should be {value!r} (the released code)"
