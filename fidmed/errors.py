"""User-facing errors.

Anything a user can cause (a missing file, a wrong shape, missing weights offline, too few images) raises a
``FidmedError`` whose message names the fix. The command-line entry points print such errors as one message,
without a stack trace, and exit with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FidmedError(Exception):
    """An expected mistake a user can fix; the message says how."""


class WeightsMissingError(FidmedError):
    """Pretrained weights are not available locally and cannot (or may not) be downloaded."""


class DataError(FidmedError):
    """A dataset is missing, empty, corrupt or inconsistent."""


class ConfigError(FidmedError):
    """A configuration value is invalid or inconsistent."""
