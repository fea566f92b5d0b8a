"""User-facing errors: one clear message, exit code 2 on the CLI, no traceback."""

from __future__ import annotations


class DoratError(Exception):
    """A problem the user can fix (bad config value, missing data, wrong checkpoint).

    The message says what is wrong and how to fix it. The CLI prints it on one line and exits 2.
    """


class DataError(DoratError):
    """A dataset is missing, truncated, corrupted or malformed."""


class ConfigError(DoratError):
    """A config value or key is invalid."""


class CheckpointError(DoratError):
    """A checkpoint is missing, corrupted or does not fit the run."""
