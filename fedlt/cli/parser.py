"""The ``fedlt`` argument parser: a run's config from argv (``--config`` files composed, then overrides), and the
experiment it describes. ``build`` and ``make_experiment`` are the public way for tests, sweeps and benchmarks to
get an :class:`~fedlt.experiment.Experiment` from command-line arguments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

COMMANDS = {
    "fit": "train a federated method (GM/PM metrics, checkpoints, CSV and W&B logging)",
    "validate": "evaluate a checkpoint (GM and PM) with --ckpt_path",
    "partition": "build and summarise the federated split (--plot out.png draws it)",
    "methods": "list the registered methods with their papers",
    "report": "tables (markdown, LaTeX) and plots of run directories, mean +- std over seeds (offline)",
    "sweep": "expand a grid of runs into a SLURM array job; submit it, or run one element (--run-index)",
}


def build_parser(command: str) -> Any:
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


def method_aliases(argv: list[str]) -> list[str]:
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


def config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif tok.startswith("--config="):
            files.append(tok.split("=", 1)[1])
    return files


def check_config_files(argv: Sequence[str]) -> None:
    """An empty config file, or one that is not valid YAML, is named with the line and column of the problem."""
    import yaml

    from fedlt.errors import UserError

    for name in config_files(argv):
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


def build(command: str, argv: Sequence[str]) -> tuple[Any, Any, Any]:
    """Parses and instantiates; returns (parser, namespace, instantiated namespace). A constructor that rejects a
    value (``ValueError``) is a :class:`~fedlt.errors.ConfigError`."""
    from fedlt.errors import ConfigError

    check_config_files(argv)
    parser = build_parser(command)
    try:
        cfg = parser.parse_args(method_aliases(list(argv)))
        init = parser.instantiate_classes(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return parser, cfg, init


def make_experiment(parser: Any, cfg: Any, init: Any) -> Any:
    from fedlt.experiment import Experiment

    dumped = parser.dump(cfg, skip_none=False)
    return Experiment(data=init.data, method=init.method, model=init.model, trainer=init.trainer,
                      logging=init.logging, seed=init.seed, name=init.name, run_dir=init.run_dir,
                      resume=getattr(init, "resume", None), config_yaml=dumped)


def experiment_from_argv(command: str, argv: Sequence[str]) -> Any:
    """The :class:`~fedlt.experiment.Experiment` that ``fedlt <command> <argv>`` would run (parsed and built; nothing
    launched or written)."""
    return make_experiment(*build(command, argv))
