"""fedlt: federated long-tailed learning with Lightning Fabric.

The public API, imported on first use (``import fedlt`` itself imports nothing heavy):

* running: :func:`experiment_from_argv` (an :class:`Experiment` from ``fedlt fit``-style arguments),
  :class:`Experiment`, :func:`main` (the command line);
* methods: :class:`FedMethod`, :class:`Reducer`, :data:`METHODS` (the registry);
* data: :class:`FederatedDataset`, :class:`DataSource`, :class:`SourceData`, :data:`SOURCES`, :data:`PARTITIONERS`;
* models: :class:`FedModel`, :func:`build_model`, :data:`MODELS`;
* losses and schedules: :class:`Loss`, :class:`Schedule`;
* errors: :class:`UserError`, :class:`ConfigError`.
"""

from fedlt._lazy import lazy_names

__version__ = "0.1.0"

_NAMES = {
    "experiment_from_argv": "cli.parser", "main": "cli.app", "Experiment": "experiment",
    "FedMethod": "methods.base", "Reducer": "methods.base", "METHODS": "methods",
    "FederatedDataset": "data", "DataSource": "data", "SourceData": "data", "SOURCES": "data",
    "PARTITIONERS": "data",
    "FedModel": "models", "build_model": "models", "MODELS": "models",
    "Loss": "losses", "Schedule": "schedules",
    "UserError": "errors", "ConfigError": "errors",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _NAMES, globals())
