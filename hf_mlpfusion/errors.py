"""Typed errors. Each message says what the user should do; the CLI prints it as one line.

Each class carries the exit code the CLI ends with (the table is in the README, "Exit codes"):
1 a mistake in the command or its inputs, 3 Hub authentication, 4 network, 5 a damaged source
checkpoint, 6 the output could not be written (disk full, no permission, out of memory); 130/143/129
for Ctrl-C, SIGTERM and SIGHUP (`Interrupted`).
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_USER = 1  # a bad option value, a missing model, an output in the way, an unsupported architecture
EXIT_USAGE = 2  # the command line itself (unknown option, missing argument): Click's own code
EXIT_AUTH = 3  # the Hub refused the token
EXIT_NETWORK = 4  # the Hub could not be reached
EXIT_CORRUPT = 5  # the source checkpoint is damaged: truncated file, missing/mis-shaped tensor, NaN weights
EXIT_WRITE = 6  # the output could not be written (disk full, no permission) or memory ran out
EXIT_INTERNAL = 70  # a bug: please report it


class MLPFusionError(Exception):
    """Base class for every error hf-mlpfusion raises on purpose (a user mistake, not a bug)."""

    exit_code = EXIT_USER


class ModelNotFoundError(MLPFusionError):
    """The model path or Hub id does not exist or cannot be read."""


class UnsupportedArchitectureError(MLPFusionError):
    """The checkpoint's architecture has no adapter."""


class InvalidConfigError(MLPFusionError):
    """A bad ratio, width, layer list or other setting."""


class OutputExistsError(MLPFusionError):
    """The output folder is in the way and --overwrite was not given (or may not be replaced)."""


class CorruptCheckpointError(MLPFusionError):
    """A weights file is truncated, corrupt or does not match its config."""

    exit_code = EXIT_CORRUPT


class UnsafeCheckpointError(MLPFusionError):
    """The checkpoint only has pickled weights and the user did not opt in."""


class NetworkError(MLPFusionError):
    """The Hub (or another endpoint) could not be reached: exit code 4, for downloads and uploads alike."""

    exit_code = EXIT_NETWORK


class OutputWriteError(MLPFusionError):
    """The output could not be written: no space left, no permission, a read-only file system.
    Nothing is left behind: the partial folder is removed."""

    exit_code = EXIT_WRITE


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: the run stops, the partial output is removed, nothing is renamed
    into place. A `KeyboardInterrupt`, so code that already handles Ctrl-C handles it too."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# Signals received by this process. The CLI's handler records each one here before it raises
# `Interrupted`, so that an interrupt which some library swallowed (a thread pool's or a
# finaliser's "Exception ignored in ...") still stops the run at the next `check_interrupted()`,
# at the latest before the output is renamed into place.
_received: list[int] = []


def note_signal(signum: int) -> None:
    _received.append(int(signum))


def check_interrupted() -> None:
    """Raise `Interrupted` if a signal was received (and perhaps swallowed) since the start."""
    if _received:
        raise Interrupted(_received[0])


def reset_signals() -> None:
    _received.clear()
