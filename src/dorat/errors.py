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


class Terminated(BaseException):
    """SIGTERM (what Slurm and most schedulers send before killing a job), raised like Ctrl-C:
    the run stops where it is, temporary files are removed, the last checkpoint is kept."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: ``signal.signal(signal.SIGTERM, raise_terminated)``."""
    raise Terminated
