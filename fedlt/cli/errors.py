"""Exit statuses and the messages of the ``fedlt`` command line: what a user or environment error prints."""

from __future__ import annotations

import os
import re
import sys

EXIT_INTERNAL = 1  # a bug in fedlt: the traceback is printed, with a line asking to report it
EXIT_USAGE = 2
EXIT_PREEMPTED = 3  # a checkpoint was written on SIGTERM/SIGUSR1; rerun with --resume auto to continue


def method_choices() -> str:
    from fedlt.methods import METHODS

    return ", ".join(f"{cls.__name__} ({key})" for key, cls in METHODS.items())


_METHOD_VALUE = re.compile(r'Parser key "method[^"]*":.*?(?:Given value: |Expected a dot import path string: |'
                           r'Import path |class_path )(\S+)')
_PLAIN_KIND = r"(?:<class '\w+'>|typing\.Literal\[[^\]]*\])"
_PLAIN_UNION = re.compile(r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes Subtypes: '
                          rf"\[({_PLAIN_KIND}(?:, {_PLAIN_KIND})*)\].* Given value: (.*)$")
_KIND_WORDS = {"<class 'int'>": "a whole number", "<class 'float'>": "a number", "<class 'bool'>": "true or false",
               "<class 'str'>": "a string", "<class 'NoneType'>": "null"}


def _kind_words(kind: str) -> str:
    """``<class 'int'>`` -> "a whole number"; ``typing.Literal['auto']`` -> "'auto'"."""
    kind = kind.strip()
    if kind.startswith("typing.Literal["):
        return " or ".join(v.strip() for v in kind[len("typing.Literal["):-1].split(","))
    return _KIND_WORDS.get(kind, kind)


# Public names that were renamed: a config that still uses the old one gets the new one in its error message.
RENAMED = {"EmbeddedDigitsDG": "EmbeddedDigitDomains"}
_DOTTED_VALUE = re.compile(r"Expected a dot import path string: (\S+)")


def usage_message(message: str) -> str:
    """The one-line form of a usage error (a jsonargparse message shortened to what the user must change)."""
    text = " ".join(str(message).split())
    dotted = _DOTTED_VALUE.search(text)
    old = dotted.group(1).strip("'\",").rsplit(".", 1)[-1] if dotted else ""
    if old in RENAMED:
        return f"{text}. {old} was renamed to {RENAMED[old]} (see CHANGELOG.md); use class_path: {RENAMED[old]}"
    if text.startswith('Parser key "method') and "Problem with given class_path" not in text:
        m = _METHOD_VALUE.search(text)
        given = m.group(1).strip("'\",") if m else "?"
        text = f"invalid method {given!r}; valid methods: {method_choices()} (e.g. --method FedProx)"
    elif "Problem with given class_path" in text:
        # The class resolved; the problem is one of its arguments: keep jsonargparse's innermost message.
        last = text[text.rindex("Problem with given class_path") :]
        m = re.match(r"Problem with given class_path '([^']+)': (.*?)(?= - Expected a <class 'NoneType'>|$)", last)
        if m:
            text = f"{m.group(2).strip(' -')} (in {m.group(1).rsplit('.', 1)[-1]}; see fedlt fit --help)"
    elif plain := _PLAIN_UNION.match(text):
        # A plain value of a union type (e.g. trainer.devices: a number or 'auto'): name the key and the choices.
        kinds = [_kind_words(k) for k in re.split(r",\s*(?![^\[]*\])", plain.group(2))]
        text = f"--{plain.group(1)} {plain.group(3)}: expected {' or '.join(kinds)}"
    elif "Does not validate against any of the Union subtypes" in text and "Errors: - " in text:
        # A constructor rejected a value (e.g. an unknown choice): keep that error, drop the schema dump.
        first = text.split("Errors: - ", 1)[1].split(" - Expected a <class 'NoneType'>", 1)[0].strip(" -")
        m = re.search(r"class_path='([^']+)'", text)
        where = f" (in {m.group(1).rsplit('.', 1)[-1]}; see fedlt fit --help)" if m else ""
        text = f"{first}{where}"
    return text


def usage_error(message: str) -> int:
    """Prints ``fedlt: error: <message>`` (shortened by :func:`usage_message`) to stderr; returns status 2."""
    print(f"fedlt: error: {usage_message(message)}", file=sys.stderr)
    return EXIT_USAGE


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the input's or the environment's fault (message and exit status 2). A bare
    ``ValueError`` is not among them: the parser turns a constructor's into a :class:`~fedlt.errors.ConfigError`
    and :meth:`~fedlt.experiment.Experiment.build_simulator` one raised while a run is built; later it is a bug."""
    from jsonargparse import ArgumentError

    from fedlt.data import DatasetNotFoundError, PartitionError
    from fedlt.engine.local_loop import NonFiniteLossError
    from fedlt.errors import UserError
    from fedlt.models import PretrainedWeightsUnavailable
    from fedlt.registry import UnknownNameError

    return (ArgumentError, UserError, DatasetNotFoundError, PartitionError, UnknownNameError,
            PretrainedWeightsUnavailable, NonFiniteLossError, FileNotFoundError)


INTERNAL_ERROR_NOTE = ("fedlt: internal error: the traceback above is a bug in fedlt, not a problem with your input; "
                       "please report it with the traceback and the command (exit status 1)")


ENVIRONMENT_ERRNOS = {28, 122, 30, 13, 1}  # ENOSPC, EDQUOT, EROFS, EACCES, EPERM


def environment_message(err: OSError) -> str:
    """A file-system fault as a sentence naming the path, the file system and what to do."""
    import errno
    import shutil

    path = err.filename or "?"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = os.path.dirname(os.path.abspath(str(path)))
        while where and not os.path.exists(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free / 2**20 if where else float("nan")
        needed = getattr(err, "needed", None)  # fedlt's WriteError knows the size of what it wrote
        size = f"{needed / 2**20:.2f} MiB needed, " if needed else ""
        return (f"cannot write {path}: {err.strerror} ({size}{free:.2f} MiB free on the file system of {where}). Free "
                "space or pick a --run_dir on a larger disk; the partial file was removed, and the run resumes from "
                "its last checkpoint with --resume auto.")
    return (f"cannot write {path}: {err.strerror}. Make the run directory writable, or pick another --run_dir "
            "(or --name).")
