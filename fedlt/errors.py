"""The exceptions that mean "the input or the environment is wrong", as opposed to a bug in fedlt.

The command line prints a :class:`UserError` as one message and exits with status 2; anything else is a bug and
keeps its traceback (exit status 1). Raise :class:`ConfigError` for a setting, or a combination of settings, that
cannot work, and for user code (a model or LightningModule) that breaks its documented contract.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits with status 2."""


class ConfigError(UserError, ValueError):
    """A setting, or a combination of settings, that cannot work (also a ``ValueError``, for callers that catch
    one)."""
