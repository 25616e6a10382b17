"""The ``fedlt`` command line (jsonargparse): fit | validate | partition | methods | sweep | report.

Constructor signatures are the schema: every hyperparameter is a typed argument of the class that uses it, and
its Google docstring is the ``--help`` text. Several ``--config`` files compose (later ones win) and any field can
be overridden on the command line, e.g. ``--method.init_args.mu 0.1``.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USAGE = 2
EXIT_PREEMPTED = 3  # a checkpoint was written on SIGTERM/SIGUSR1; rerun with --resume auto to continue

COMMANDS = {
    "fit": "train a federated method (GM/PM metrics, checkpoints, CSV and W&B logging)",
    "validate": "evaluate a checkpoint (GM and PM) with --ckpt_path",
    "partition": "build and summarise the federated split (--plot out.png draws it)",
    "methods": "list the registered methods with their papers",
    "report": "tables (markdown, LaTeX) and plots of run directories, mean +- std over seeds (offline)",
    "sweep": "expand a grid of runs into a SLURM array job; submit it, or run one element (--run-index)",
}


def _parser(command: str) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from fedlt.config import LoggingConfig, ModelConfig, TrainerConfig
    from fedlt.data import FederatedDataset
    from fedlt.methods import FedMethod

    # allow_abbrev=False: --trainer.round is an error, never silently --trainer.rounds.
    p = ArgumentParser(prog=f"fedlt {command}", description=COMMANDS[command], exit_on_error=False,
                       allow_abbrev=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones win")
    p.add_argument("--seed", type=int, default=0, help="experiment seed")
    p.add_argument("--name", type=str, default="run", help="run name (W&B run name; default run dir runs/<name>)")
    p.add_argument("--run_dir", type=str | None, default=None, help="run directory (default runs/<name>)")
    p.add_class_arguments(FederatedDataset, "data", help="federated long-tailed dataset")
    p.add_subclass_arguments(FedMethod, "method", help="federated method (class name, e.g. FedAvg)")
    p.add_class_arguments(ModelConfig, "model")
    p.add_class_arguments(TrainerConfig, "trainer")
    p.add_class_arguments(LoggingConfig, "logging")
    if command == "fit":
        p.add_argument("--resume", type=str | None, default=None,
                       help="'auto' continues from the latest checkpoint of the run dir; or a checkpoint path")
    if command == "validate":
        p.add_argument("--ckpt_path", type=str, required=True, help="checkpoint to evaluate")
    if command == "partition":
        p.add_argument("--plot", type=str | None, default=None, help="write a PNG of the partition here")
        p.add_argument("--out", type=str | None, default=None, help="write the JSON summary here")
    return p


def _method_choices() -> str:
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


def _usage_error(message: str) -> int:
    text = " ".join(str(message).split())
    if text.startswith('Parser key "method') and "Problem with given class_path" not in text:
        m = _METHOD_VALUE.search(text)
        given = m.group(1).strip("'\",") if m else "?"
        text = f"invalid method {given!r}; valid methods: {_method_choices()} (e.g. --method FedProx)"
    elif "Problem with given class_path" in text:
        # The class resolved; the problem is one of its arguments: keep jsonargparse's innermost message.
        last = text[text.rindex("Problem with given class_path") :]
        m = re.match(r"Problem with given class_path '([^']+)': (.*?)(?= - Expected a <class 'NoneType'>|$)", last)
        if m:
            text = f"{m.group(2).strip(' -')} (in {m.group(1).rsplit('.', 1)[-1]}; see fedlt fit --help)"
    elif _PLAIN_UNION.match(text):
        # A plain value of a union type (e.g. trainer.devices: a number or 'auto'): name the key and the choices.
        m = _PLAIN_UNION.match(text)
        kinds = [_kind_words(k) for k in re.split(r",\s*(?![^\[]*\])", m.group(2))]
        text = f"--{m.group(1)} {m.group(3)}: expected {' or '.join(kinds)}"
    elif "Does not validate against any of the Union subtypes" in text and "Errors: - " in text:
        # A constructor rejected a value (e.g. an unknown choice): keep that error, drop the schema dump.
        first = text.split("Errors: - ", 1)[1].split(" - Expected a <class 'NoneType'>", 1)[0].strip(" -")
        m = re.search(r"class_path='([^']+)'", text)
        where = f" (in {m.group(1).rsplit('.', 1)[-1]}; see fedlt fit --help)" if m else ""
        text = f"{first}{where}"
    print(f"fedlt: error: {text}", file=sys.stderr)
    return EXIT_USAGE


def _method_aliases(argv: list[str]) -> list[str]:
    """Lets ``--method fedprox`` (a registry key) stand for ``--method FedProx``."""
    from fedlt.methods import METHODS

    out = list(argv)
    for i, tok in enumerate(out):
        if tok in ("--method", "--method.class_path") and i + 1 < len(out) and out[i + 1] in METHODS:
            out[i + 1] = METHODS.get(out[i + 1]).__name__
        elif tok.startswith(("--method=", "--method.class_path=")):
            key, _, val = tok.partition("=")
            if val in METHODS:
                out[i] = f"{key}={METHODS.get(val).__name__}"
    return out


def _config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif tok.startswith("--config="):
            files.append(tok.split("=", 1)[1])
    return files


def _check_config_files(argv: Sequence[str]) -> None:
    """An empty config file, or one that is not valid YAML, is named with the line and column of the problem."""
    import yaml

    from fedlt.experiment import UserError

    for name in _config_files(argv):
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            continue  # jsonargparse says so (or the value is inline YAML)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as err:
            raise UserError(f"config file {name}: not UTF-8 text (byte {err.start}); is it a YAML file?") from None
        except OSError as err:
            raise UserError(f"config file {name}: cannot be read ({err.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise UserError(f"config file {name}{where}: not valid YAML ({problem})") from None
        if loaded is None:
            raise UserError(f"config file {name} is empty (no settings, only blanks or comments)")
        if not isinstance(loaded, dict):
            raise UserError(f"config file {name}: expected a mapping of settings (key: value), got a "
                            f"{type(loaded).__name__}")


def _build(command: str, argv: Sequence[str]) -> tuple[Any, Any, Any]:
    """Parses and instantiates; returns (parser, namespace, instantiated namespace)."""
    _check_config_files(argv)
    parser = _parser(command)
    cfg = parser.parse_args(_method_aliases(list(argv)))
    init = parser.instantiate_classes(cfg)
    return parser, cfg, init


def _experiment(parser: Any, cfg: Any, init: Any) -> Any:
    from fedlt.experiment import Experiment

    dumped = parser.dump(cfg, skip_none=False)
    return Experiment(data=init.data, method=init.method, model=init.model, trainer=init.trainer,
                      logging=init.logging, seed=init.seed, name=init.name, run_dir=init.run_dir,
                      resume=getattr(init, "resume", None), config_yaml=dumped)


def methods_markdown() -> str:
    """The README's table of methods (name, paper, venue, config), generated from the registry."""
    from fedlt.methods import METHODS

    rows = ["| name | paper | venue | config |", "|---|---|---|---|"]
    for key, cls in METHODS.items():
        paper = cls.paper
        title = paper.title if paper else "-"
        if paper and paper.arxiv:
            title = f"[{title}](https://arxiv.org/abs/{paper.arxiv})"
        rows.append(f"| {key} | {title} | {paper.venue if paper else '-'} | `configs/method/{key}.yaml` |")
    return "\n".join(rows)


def cmd_methods(argv: Sequence[str]) -> int:
    """Prints the registered methods and their papers (``--markdown``: the README table)."""
    from fedlt.methods import METHODS

    if argv and argv[0] in ("-h", "--help"):
        print("usage: fedlt methods [--markdown]\n\n" + COMMANDS["methods"])
        return 0
    if argv and argv[0] == "--markdown":
        print(methods_markdown())
        return 0
    if argv:
        return _usage_error(f"unknown argument {argv[0]!r} for 'fedlt methods'; valid: --markdown")
    width = max(len(k) for k in METHODS.names())
    for key, cls in METHODS.items():
        paper = cls.paper.short() if cls.paper else "-"
        print(f"{key:<{width}}  {cls.__name__:<12}  {paper}")
    return 0


def _fit_all_domains(parser: Any, cfg: Any, init: Any) -> int:
    """``data.target_domain: all``: one leave-one-domain-out run per domain (in ``<run_dir>/<domain>``), then the
    per-target and mean accuracies, printed and written to ``<run_dir>/domains.json``."""
    import copy
    import json
    from pathlib import Path

    from fedlt.callbacks.report import domain_summary, format_domain_table

    root = Path(init.run_dir or os.path.join("runs", init.name))
    reports: dict[str, dict[str, Any]] = {}
    for domain in init.data.domain_names:
        sub = copy.deepcopy(cfg)
        sub.data.target_domain = domain
        sub.name = f"{init.name}-{domain}"
        sub.run_dir = str(root / domain)
        print(f"fedlt: target domain {domain} ({len(reports) + 1}/{len(init.data.domain_names)})", flush=True)
        report = _experiment(parser, sub, parser.instantiate_classes(sub)).fit()
        if report.get("preempted"):
            return EXIT_PREEMPTED
        reports[domain] = report
    summary = domain_summary(reports)
    # Rank 0 of every launcher: RANK / LOCAL_RANK under Fabric's own, SLURM_PROCID under srun (which sets neither).
    if all(int(os.environ.get(k, "0")) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
        root.mkdir(parents=True, exist_ok=True)
        (root / "domains.json").write_text(json.dumps(summary, indent=2))
        print(format_domain_table(summary), flush=True)
    return 0


def _run_command(command: str, argv: Sequence[str]) -> int:
    parser, cfg, init = _build(command, argv)
    if command == "fit" and getattr(init.data, "target_domain", None) == "all":
        return _fit_all_domains(parser, cfg, init)
    exp = _experiment(parser, cfg, init)
    if command == "fit":
        if exp.fit().get("preempted"):
            return EXIT_PREEMPTED
    elif command == "validate":
        exp.validate(init.ckpt_path)
    else:
        exp.partition(plot=init.plot, out=init.out)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from jsonargparse import ArgumentError

    from fedlt.data import DatasetNotFoundError, PartitionError
    from fedlt.engine.local_loop import NonFiniteLossError
    from fedlt.experiment import UserError
    from fedlt.models import PretrainedWeightsUnavailable
    from fedlt.registry import UnknownNameError

    return (ArgumentError, UserError, DatasetNotFoundError, PartitionError, UnknownNameError,
            PretrainedWeightsUnavailable, NonFiniteLossError, ValueError, FileNotFoundError)


_ENVIRONMENT_ERRNOS = {28, 122, 30, 13, 1}  # ENOSPC, EDQUOT, EROFS, EACCES, EPERM


def _environment_message(err: OSError) -> str:
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
        return _usage_error(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    if command == "methods":
        return cmd_methods(rest)
    if command == "sweep":
        from fedlt.sweep import cmd_sweep

        return cmd_sweep(rest)
    if command == "report":
        from fedlt.report import cmd_report

        return cmd_report(rest)
    return _guarded(command, rest)


def _guarded(command: str, rest: Sequence[str]) -> int:
    """fit / validate / partition with the error policy: user and environment errors -> message and status 2."""
    handler: Callable[[str, Sequence[str]], int] = _run_command
    # fit: from here on SIGTERM/SIGUSR1 (SLURM's preemption signals) never kill fedlt with the default action:
    # caught during the imports and parsing, they reach fit's own handler, which stops before writing anything.
    from fedlt.signals import PreemptionFlag

    flag = PreemptionFlag().install() if command == "fit" else None
    try:
        return handler(command, rest)
    except _user_errors() as err:
        return _usage_error(str(err))
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise  # not the environment's fault: keep the traceback
        return _usage_error(_environment_message(err))
    except KeyboardInterrupt:
        print("fedlt: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_distributed()
        if flag is not None:
            flag.uninstall()


def _shutdown_distributed() -> None:
    """Destroys the process group of a multi-process run before the interpreter exits. Without it, gloo's worker
    threads outlive the interpreter's finalization and the process can abort (SIGABRT, "terminate called without an
    active exception") after its work is done, turning a finished run into a failed exit status. Destroying a group
    is local to each rank (no collective), so it is safe on the error path too."""
    dist = sys.modules.get("torch.distributed")  # not imported: nothing was launched (and a usage error stays fast)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entrypoint() -> None:
    """Console-script wrapper: exits with :func:`main`'s status. Output into a closed pipe (``fedlt methods |
    head -1``) ends quietly with status 0, as ``ls | head`` does: the reader wanted no more."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush at exit on stderr: point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 0
    sys.exit(status)
