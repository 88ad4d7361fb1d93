"""The `mlpfusion` command: a Typer app whose commands are thin shells over the library."""

from __future__ import annotations

import typer

from .compress import compress
from .info import info

app = typer.Typer(
    name="mlpfusion",
    help="Make Hugging Face transformer checkpoints smaller by MLP fusion (ICML 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("compress")(compress)
app.command("info")(info)

try:  # publishing (its own module, so the core works without it)
    from .push import push

    app.command("push")(push)
except ImportError:  # pragma: no cover - only while the module is absent
    pass

try:
    from .evaluate import evaluate

    app.command("evaluate")(evaluate)
except ImportError:  # pragma: no cover
    pass


def main() -> None:
    from .common import run

    run(app)  # signal handlers first; any failure is one line and an exit code (cli/common.py)


if __name__ == "__main__":
    main()
