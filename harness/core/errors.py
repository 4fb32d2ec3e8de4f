"""The error hierarchy: every failure a user can cause is a `HarnessError`.

Messages say what went wrong, where (file, tensor, YAML field) and how to fix it; the CLI prints
them on one line and exits with `exit_code` (2), without a traceback unless `--debug` is given.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 2


class ConfigError(HarnessError):
    """A config file or value is invalid (names the YAML path of the field)."""


class CheckpointError(HarnessError):
    """A checkpoint is missing, corrupt, or incompatible with the others (names file/tensor)."""


class MethodError(HarnessError):
    """A merge method is unknown, misconfigured, or cannot compute a result (e.g. NaNs)."""


class EvaluationError(HarnessError):
    """A task is unknown or lm-eval failed on it."""


class StoreError(HarnessError):
    """The result store is locked, corrupt, or would overwrite a finished result."""


class JobsFailed(HarnessError):
    """Jobs of a run failed: each is recorded in the store with its one-line error, the run went
    on, and the command exits 1 (as `run` does), since the input itself was valid."""

    exit_code = 1
