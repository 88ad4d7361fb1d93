"""Typed errors. Each message says what the user should do; the CLI prints it as one line."""

from __future__ import annotations


class MLPFusionError(Exception):
    """Base class for every error hf-mlpfusion raises on purpose (a user mistake, not a bug)."""

    exit_code = 1


class ModelNotFoundError(MLPFusionError):
    """The model path or Hub id does not exist or cannot be read."""


class UnsupportedArchitectureError(MLPFusionError):
    """The checkpoint's architecture has no adapter."""


class InvalidConfigError(MLPFusionError):
    """A bad ratio, width, layer list or other setting."""


class OutputExistsError(MLPFusionError):
    """The output folder is in the way and --overwrite was not given."""


class CorruptCheckpointError(MLPFusionError):
    """A weights file is truncated, corrupt or does not match its config."""


class UnsafeCheckpointError(MLPFusionError):
    """The checkpoint only has pickled weights and the user did not opt in."""


class NetworkError(MLPFusionError):
    """The Hub (or another endpoint) could not be reached: exit code 4, for downloads and uploads alike."""

    exit_code = 4
