"""The error policy: the input's or environment's fault -> one message, exit status 2; a bug -> its traceback and
exit status 1 with a line asking to report it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import fedlt.cli.app as cli_main
from fedlt.cli import EXIT_INTERNAL, main
from fedlt.errors import ConfigError, UserError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

BUGGY = '''
from fedlt.methods import FedAvg


class Buggy(FedAvg):
    """FedAvg whose training step has a bug."""

    def training_step(self, batch, ctx):
        raise ValueError("a bug in a training step")
'''


def test_a_bad_setting_is_a_config_error_with_exit_2(tmp_path, capsys):
    assert main(["fit", "--config", TINY, "--run_dir", str(tmp_path / "r"), "--method.init_args.lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "lr must be > 0" in err and "Traceback" not in err
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


def test_a_value_error_in_training_is_a_bug_not_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "buggy.py").write_text(textwrap.dedent(BUGGY))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    with pytest.raises(ValueError, match="a bug in a training step"):
        main(["fit", "--config", TINY, "--run_dir", str(tmp_path / "run"), "--method", "buggy.Buggy"])


def test_the_console_script_prints_the_traceback_and_asks_for_a_report_on_a_bug(monkeypatch, capsys):
    def broken(argv=None):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli_main, "main", broken)
    with pytest.raises(SystemExit) as done:
        cli_main.entrypoint()
    assert done.value.code == EXIT_INTERNAL == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal bug" in err
    assert err.strip().splitlines()[-1].startswith("fedlt: internal error: the traceback above is a bug in fedlt")
