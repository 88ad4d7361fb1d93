"""What every command shares: consoles and turning library errors into one red line + exit code."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

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
