"""User-facing errors.

Every mistake a *user* can make (bad config, unknown method, missing file, malformed data row) raises a
subclass of :class:`TunelabError` with a one-line message that names the problem and the fix. The CLI
prints that line and exits with status 2, never a traceback. Programming errors stay ordinary
exceptions.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A user mistake: the message is one line that names the problem and how to fix it."""

    exit_code = 2


class ConfigError(TunelabError):
    """Invalid experiment/method configuration (unknown key, bad value)."""


class MethodError(TunelabError):
    """Unknown PEFT method, bad method option, or target modules that match nothing."""


class DataError(TunelabError):
    """Missing, empty or malformed data (the message names file and line)."""


class ModelError(TunelabError):
    """A model that cannot be found or loaded."""
