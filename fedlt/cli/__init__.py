"""The ``fedlt`` command line (jsonargparse): fit | validate | partition | methods | sweep | report.

Constructor signatures are the schema: every hyperparameter is a typed argument of the class that uses it, and
its Google docstring is the ``--help`` text. Several ``--config`` files compose (later ones win) and any field can
be overridden on the command line, e.g. ``--method.init_args.mu 0.1``.

Modules: :mod:`~fedlt.cli.app` (dispatch), :mod:`~fedlt.cli.parser` (argv -> config -> experiment),
:mod:`~fedlt.cli.errors` (exit statuses and messages), :mod:`~fedlt.cli.commands` (fit / validate / partition /
methods), :mod:`~fedlt.cli.sweep` and :mod:`~fedlt.cli.slurm` (SLURM array sweeps), :mod:`~fedlt.cli.report` with
:mod:`~fedlt.cli.report_runs`, :mod:`~fedlt.cli.report_tables` and :mod:`~fedlt.cli.report_plots`.
"""

from fedlt.cli.app import entrypoint, main
from fedlt.cli.commands import methods_markdown
from fedlt.cli.errors import EXIT_INTERNAL, EXIT_PREEMPTED, EXIT_USAGE
from fedlt.cli.parser import COMMANDS, build, build_parser, experiment_from_argv, make_experiment

__all__ = [
    "COMMANDS",
    "EXIT_INTERNAL",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "build",
    "build_parser",
    "entrypoint",
    "experiment_from_argv",
    "main",
    "make_experiment",
    "methods_markdown",
]
