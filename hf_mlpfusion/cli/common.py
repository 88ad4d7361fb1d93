"""What every command shares: consoles, turning library errors into one red line + exit code, and the
habits of every command (-h/--help, --version, flags shown as flags, --json, -q/--quiet)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from hf_mlpfusion.errors import MLPFusionError

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func):
    """Decorator: a user mistake is one red line and a non-zero exit, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MLPFusionError as err:
            fail(str(err), getattr(err, "exit_code", 1))
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted:[/] nothing was written; run the command again to restart")
            raise typer.Exit(130) from None
        except MemoryError:
            fail("out of memory: fuse fewer layers at a time (--layers) or use a machine with more memory")

    return wrapper


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
    hf_logging.disable_progress_bar()  # the Hub's too
    hf_logging.set_verbosity_error()
    try:
        yield lambda msg: None
    finally:
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


def is_local(name: str) -> bool:
    """Does MODEL name a local path (as transformers would decide), rather than a Hub id?"""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 \
        or os.sep in name.replace("/", "")
