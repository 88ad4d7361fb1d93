"""The `mlpfusion` Typer app: its commands are thin shells over the library."""

from __future__ import annotations

import typer

from .common import HELP_OPTION_NAMES, Command, Group, VersionFlag
from .compress import compress
from .evaluate import evaluate
from .info import info
from .push import push

app = typer.Typer(
    name="mlpfusion",
    help="Make Hugging Face transformer checkpoints smaller by MLP fusion (ICML 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTION_NAMES},
    cls=Group,
)


@app.callback()
def _root(version: VersionFlag = None) -> None:
    """Make Hugging Face transformer checkpoints smaller by MLP fusion (ICML 2023)."""


app.command("compress", cls=Command)(compress)
app.command("push", cls=Command)(push)
app.command("info", cls=Command)(info)
app.command("evaluate", cls=Command)(evaluate)
