"""What every command shares: consoles, the one place that turns any failure into one red line and
an exit code, and the signal handling installed once at the CLI's entry.

Exit codes (README, "Exit codes"): 0 done, 1 a mistake in the command or its inputs, 2 a malformed
command line (Click's), 3 Hub authentication, 4 network, 5 a damaged source checkpoint, 6 the output
could not be written or memory ran out, 70 an internal error (a bug), 128 + N for signal N (130
Ctrl-C, 143 SIGTERM, 129 SIGHUP). Set MLPFUSION_TRACEBACK=1 to see the traceback of an error.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from hf_mlpfusion.errors import (
    EXIT_INTERNAL,
    EXIT_WRITE,
    Interrupted,
    MLPFusionError,
    note_signal,
)

# Typer (0.29+) vendors its own Click: take the exception classes from Typer itself, whichever it uses.
_click_errors = sys.modules[typer.BadParameter.__module__]
ClickException, NoArgsIsHelpError = _click_errors.ClickException, _click_errors.NoArgsIsHelpError
PASS_THROUGH = (typer.Exit, typer.Abort, ClickException)  # Click prints and exits as usual

console = Console()
err_console = Console(stderr=True)

HANDLED_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                                    getattr(signal, "SIGHUP", None)) if s is not None)


def fail(message: str, code: int = 1) -> None:
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())  # always one line
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:limit]


def os_error_message(err: OSError) -> str:
    """One line for an OSError that no library code turned into a typed error."""
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    what = err.strerror or _first_line(err) or err.__class__.__name__
    hint = {
        errno.ENOSPC: "free some space or choose another --output",
        errno.EACCES: "check the permissions or choose another folder",
        errno.EPERM: "check the permissions or choose another folder",
        errno.EROFS: "the file system is read-only: choose another folder",
        errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --output",
    }.get(err.errno, "check the path and the disk, then run the command again")
    return f"could not access{where}: {what}; {hint}"


def describe_failure(err: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for anything a command can raise."""
    if isinstance(err, MLPFusionError):
        return str(err), int(getattr(err, "exit_code", 1) or 1)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return ("out of memory: fuse fewer layers at a time (--layers), use --device cpu, or use a machine "
                "with more memory; nothing half-written was left behind"), EXIT_WRITE
    if isinstance(err, OSError):
        return os_error_message(err), EXIT_WRITE
    return (f"internal error ({err.__class__.__name__}: {_first_line(err)}); nothing half-written was left behind. Please report "
            "it with the command you ran; MLPFUSION_TRACEBACK=1 shows the traceback"), EXIT_INTERNAL


def interrupted_message(err: KeyboardInterrupt) -> tuple[str, str, int]:
    """(head, rest, exit code) of the line printed when a signal stops a command."""
    signum = int(getattr(err, "signum", signal.SIGINT))
    head = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return head, "nothing half-written was left behind; run the command again to restart", 128 + signum


def user_errors(func):
    """Decorator of every command: any failure is one red line and a non-zero exit, never a traceback
    (MLPFUSION_TRACEBACK=1 re-raises, for debugging)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PASS_THROUGH:
            raise  # typer.Exit / usage errors: Click (and `run`) handle them
        except KeyboardInterrupt as err:
            head, rest, code = interrupted_message(err)
            err_console.print(f"[bold red]{head}:[/] {escape(rest)}", highlight=False, soft_wrap=True)
            _reported.append(code)
            raise typer.Exit(code) from None
        except Exception as err:  # noqa: BLE001 - the one place that maps everything to an exit code
            if os.environ.get("MLPFUSION_TRACEBACK"):
                raise
            message, code = describe_failure(err)
            fail(message, code)

    return wrapper


def _raise_interrupted(signum, frame):
    note_signal(signum)  # remembered, should a library swallow the exception raised here
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP all raise `Interrupted` in the main thread, at whatever stage:
    the partial output is removed, nothing is renamed into place, and the exit is 128 + the signal."""
    for sig in HANDLED_SIGNALS:
        try:
            signal.signal(sig, _raise_interrupted)
        except (ValueError, OSError):  # not the main thread (embedded use): leave Python's default
            pass


_reported: list[int] = []  # exit codes of interrupts already printed by `user_errors`


def run(app, args: list[str] | None = None) -> None:
    """Run the Typer app the way every entry point does: signal handlers first; a malformed command
    line is one line and exit 2 (instead of Click's usage box); an interrupt that lands outside a
    command (while Click parses, after a command returned) ends the same way as one inside it."""
    from hf_mlpfusion.errors import _received

    install_signal_handlers()
    try:
        code = app(args=args, prog_name="mlpfusion", standalone_mode=False)
    except KeyboardInterrupt as err:  # before Typer's own handler is in place
        _exit_interrupted(err)
    except NoArgsIsHelpError as err:
        err.show()  # `mlpfusion` alone: the help, as before
        raise SystemExit(err.exit_code) from None
    except ClickException as err:
        where = getattr(getattr(err, "ctx", None), "command_path", None) or "mlpfusion"
        message = " ".join(err.format_message().split())
        err_console.print(f"[bold red]error:[/] {escape(message)} (see '{escape(where)} --help')", highlight=False,
                          soft_wrap=True)
        raise SystemExit(err.exit_code) from None
    except typer.Abort:
        err_console.print("[bold red]error:[/] aborted", highlight=False)
        raise SystemExit(1) from None
    code = code if isinstance(code, int) else 0
    if _received and not _reported and code:
        _exit_interrupted(Interrupted(_received[0]))  # Typer turned it into a bare exit 130
    raise SystemExit(code)


def _exit_interrupted(err: KeyboardInterrupt) -> None:
    head, rest, code = interrupted_message(err)
    err_console.print(f"[bold red]{head}:[/] {escape(rest)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)
