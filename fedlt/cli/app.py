"""``fedlt``: the dispatch of the console script and of ``python -m fedlt`` to the commands."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from fedlt.cli.commands import cmd_methods, guarded
from fedlt.cli.errors import EXIT_INTERNAL, EXIT_USAGE, INTERNAL_ERROR_NOTE, usage_error
from fedlt.cli.parser import COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlt`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore", category=UserWarning)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fedlt {" + ",".join(COMMANDS) + "} ...\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return usage_error(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    if command == "methods":
        return cmd_methods(rest)
    if command == "sweep":
        from fedlt.cli.sweep import cmd_sweep

        return cmd_sweep(rest)
    if command == "report":
        from fedlt.cli.report import cmd_report

        return cmd_report(rest)
    return guarded(command, rest)


def entrypoint() -> None:
    """Console-script wrapper: exits with :func:`main`'s status. Output into a closed pipe (``fedlt methods |
    head -1``) ends quietly with status 0, as ``ls | head`` does: the reader wanted no more. An exception that
    reaches here is a bug in fedlt: its traceback, one line asking to report it, exit status 1."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush at exit on stderr: point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 0
    except Exception:
        traceback.print_exc()
        print(INTERNAL_ERROR_NOTE, file=sys.stderr)
        status = EXIT_INTERNAL
    sys.exit(status)
