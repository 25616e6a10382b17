"""What the documentation and the help texts name must exist: ``fedlt`` commands, ``--section.key`` options, and
repository files (configs, docs, benchmarks, scripts)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), ROOT / "benchmarks" / "README.md"])
COMMAND = re.compile(r"(?<![\w/.-])fedlt ([a-z][a-z_-]+)")  # searched in code only (spans and blocks)
CODE = re.compile(r"```.*?```|``[^`]+``|`[^`\n]+`", re.S)
OPTION = re.compile(r"(?<![\w-])--((?:data|model|method|trainer|logging)(?:\.[A-Za-z_][\w]*)+)")
PATH = re.compile(r"(?<![\w/.-])((?:configs|docs|benchmarks|slurm|tests|fedlt|\.ci)/[\w./-]*[\w])([*<{]?)")
# Paths a text names as a user's own files or outputs, not the repository's.
NOT_REPO = ("benchmarks/results/gpu_", "configs/method/<", "fedlt/methods/<",
            "fedlt/methods/fedmine.py",  # the how-to's example of a new method
            "configs/trainers/")  # the layout of an author's released code, which a method docstring cites


@cache
def _fit_keys() -> set[str]:
    """Every dotted key ``fedlt fit`` accepts, with the init arguments of every registered class under it."""
    import inspect

    from fedlt.cli import build_parser
    from fedlt.data import PARTITIONERS, SOURCES
    from fedlt.methods import METHODS

    parser = build_parser("fit")
    keys = {opt.lstrip("-") for action in parser._actions for opt in action.option_strings}
    def init_args(classes) -> set[str]:
        return {name for cls in classes for klass in inspect.getmro(cls)
                for name in inspect.signature(klass.__init__).parameters if name not in ("self", "args", "kwargs")}
    keys |= {f"method.init_args.{a}" for a in init_args([c for _, c in METHODS.items()])}
    keys |= {f"data.source.init_args.{a}" for a in init_args([c for _, c in SOURCES.items()])}
    keys |= {f"data.partition.init_args.{a}" for a in init_args([c for _, c in PARTITIONERS.items()])}
    return keys


def _known(key: str) -> bool:
    keys = _fit_keys()
    # A key is known when it, or the key it extends (a subclass argument such as method.init_args.loss.gamma, a
    # dict entry such as model.kwargs.hidden), is an option of fedlt fit.
    parts = key.split(".")
    return any(".".join(parts[:n]) in keys for n in range(len(parts), 1, -1)) or key in keys


def _texts() -> list[tuple[str, str]]:
    from fedlt.cli import build_parser

    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in DOCS]
    for command in ("fit", "validate", "partition"):
        out.append((f"fedlt {command} --help", build_parser(command).format_help()))
    return out


def _test_bad(text: str) -> list[str]:
    """What ``text`` names that does not exist."""
    from fedlt.cli import COMMANDS

    code = re.sub(r"\s#\s.*", "", " \n".join(CODE.findall(text)))  # commands, not the comments beside them
    bad = [f"command 'fedlt {c}'" for c in COMMAND.findall(code) if c not in COMMANDS]
    bad += [f"option --{k}" for k in OPTION.findall(text) if not _known(k)]
    for path, glob in PATH.findall(text):
        if glob or path.startswith(NOT_REPO):  # a pattern (configs/paper/fedsm_*.yaml), not one file
            continue
        if not (ROOT / path).exists() and not (ROOT / path.rstrip(".")).exists():
            bad.append(f"file {path}")
    return sorted(set(bad))


@pytest.mark.parametrize("where, text", _texts(), ids=lambda v: v if len(v) < 60 else None)
def test_named_commands_options_and_files_exist(where, text):
    bad = _test_bad(text)
    assert not bad, f"{where} names what does not exist: {bad}"


def test_the_checker_catches_what_does_not_exist():
    from fedlt.cli import COMMANDS

    assert "models" not in COMMANDS and _known("trainer.rounds") and not _known("trainer.roundz")
    assert COMMAND.findall(" ".join(CODE.findall("fedlt builds it; run `fedlt models` or ``fedlt fit``"))) == [
        "models", "fit"]
    assert not _test_bad("`fedlt fit --trainer.rounds 2`  see configs/quickstart.yaml")
    assert _test_bad("`fedlt models`, --trainer.roundz, configs/nope.yaml") == [
        "command 'fedlt models'", "file configs/nope.yaml", "option --trainer.roundz"]
    assert _known("method.init_args.mu") and _known("model.kwargs.hidden") and not _known("data.val_frac")
