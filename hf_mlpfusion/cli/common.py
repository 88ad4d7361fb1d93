"""What every command shares: consoles, the one place that turns any failure into one red line and
an exit code, the signal handling installed once at the CLI's entry, and the habits of every
command (-h/--help, --version, flags shown as flags, --json, -q/--quiet).

Exit codes (README, "Exit codes"): 0 done, 1 a mistake in the command or its inputs, 2 a malformed
command line (Click's), 3 Hub authentication, 4 network, 5 a damaged source checkpoint, 6 the output
could not be written or memory ran out, 70 an internal error (a bug), 128 + N for signal N (130
Ctrl-C, 143 SIGTERM, 129 SIGHUP). Set MLPFUSION_TRACEBACK=1 to see the traceback of an error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import logging
import os
import re
import signal
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

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
UsageError = _click_errors.UsageError  # what a command raises for a missing argument it checks itself
_current_context = importlib.import_module(_click_errors.__name__.rsplit(".", 1)[0] + ".globals").get_current_context
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
            from hf_mlpfusion.errors import _received

            if _received:  # an error in the wake of a signal (a library's half-done import, say): the signal
                head, rest, code = interrupted_message(Interrupted(_received[0]))
                err_console.print(f"[bold red]{head}:[/] {escape(rest)}", highlight=False, soft_wrap=True)
                _reported.append(code)
                raise typer.Exit(code) from None
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
        err_console.print(f"[bold red]error:[/] {escape(usage_error_line(err))}", highlight=False, soft_wrap=True)
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


# -- habits every command shares: -h/--help, --version, flags shown as flags, --json, -q -------------

HELP_OPTION_NAMES = ["-h", "--help"]


def _show_version(value: bool) -> None:
    if value:
        from .main import version_line

        typer.echo(version_line())
        raise typer.Exit()


def flag(*names: str, help: str, **kwargs):
    """A boolean option shown as a flag (`--overwrite`), not `--overwrite <bool>`."""
    return typer.Option(*names, help=help, metavar="", **kwargs)


VersionFlag = Annotated[Optional[bool], flag("--version", help="Print the version and exit.", callback=_show_version,
                                              is_eager=True, show_default=False)]
JsonFlag = Annotated[bool, flag("--json", help="Print the result as one JSON object on stdout (progress goes to stderr).")]
QuietFlag = Annotated[bool, flag("--quiet", "-q", help="No progress on stderr (errors only).")]


def _flag_help(option):
    if option is not None:
        option.metavar = ""
    return option


class Command(TyperCommand):
    """A command whose -h/--help is shown as a flag too."""

    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


_VALUES = ("true", "false", "yes", "no", "on", "off", "1", "0")


def refuse_flag_values(*arguments) -> None:
    """A positional argument that reads as a flag's value (`compress --overwrite true` makes 'true' the
    MODEL) is a malformed command line: exit 2 with the one line that says how flags are written."""
    for value in arguments:
        if value is not None and str(value).lower() in _VALUES[:6] and not os.path.exists(os.path.expanduser(str(value))):
            raise UsageError(f"{str(value)!r} stands where a model, folder or repo id belongs: flags take no value "
                             f"(write --overwrite, not --overwrite {value})", _current_context(silent=True))


def usage_error_line(err) -> str:
    """A usage error (missing argument, unknown option, ...) as one line that says what to do."""
    message = " ".join(str(err.format_message()).split())
    ctx = getattr(err, "ctx", None)
    extra = re.match(r"Got unexpected extra arguments? ?(?:\(s\))? \((.*)\)", message)
    if extra and extra.group(1).split()[0].lower() in _VALUES:
        value = extra.group(1).split()[0]
        message += f": flags take no value (write --overwrite, not --overwrite {value})"
    where = f"`{ctx.command_path} -h`" if ctx is not None else "`mlpfusion -h`"
    return f"{message.rstrip('.')}; see {where}"


class Group(TyperGroup):
    """The app: -h/--help shown as a flag, and usage errors as one `error:` line, like every other mistake."""

    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:  # typer >= 0.2x vendors click; older typer runs on click itself
            from typer._click.exceptions import ClickException
        except ImportError:  # pragma: no cover - depends on the installed typer
            from click.exceptions import ClickException
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as err:
            if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                err_console.print(f"[bold red]error:[/] {escape(usage_error_line(err))}", highlight=False,
                                  soft_wrap=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            err_console.print("[bold red]aborted[/]")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def emit_json(obj) -> None:
    """The one JSON object a command prints with --json (NaN/inf are not JSON: they must be None already)."""
    typer.echo(json.dumps(obj, indent=2, allow_nan=False))


@contextlib.contextmanager
def progress(quiet: bool, start: str = "starting"):
    """Yields say(message): a spinner on stderr, or, with -q, nothing at all on stderr: the Hub's and
    transformers' progress bars and transformers' warnings are silenced for the length of the command."""
    if not quiet:
        with err_console.status(start) as status:
            yield lambda msg: status.update(msg)
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging  # the transformers package alone: no torch

    hub_bars_off, bars_on, verbosity = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled(), \
        hf_logging.get_verbosity()
    ours = logging.getLogger("hf_mlpfusion")  # its notes ("compressing in memory, not streaming: ...")
    level = ours.level
    hf_logging.disable_progress_bar()  # the Hub's too
    hf_logging.set_verbosity_error()
    ours.setLevel(logging.ERROR)
    try:
        yield lambda msg: None
    finally:
        ours.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            disable_progress_bars()
        else:
            enable_progress_bars()


def note(message: str, quiet: bool = False) -> None:
    """A line of information on stderr (not with -q)."""
    if not quiet:
        err_console.print(message, highlight=False, soft_wrap=True)


