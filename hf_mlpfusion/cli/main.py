"""The `mlpfusion` entry point.

`mlpfusion --version` is answered before Typer (or anything else) is imported; everything else
builds the app in `cli/app.py`. Neither `--help` nor `--version` imports torch or transformers:
the commands import the library inside their bodies (see benchmarks/startup.py).
"""

from __future__ import annotations

import sys


def version_line() -> str:
    from hf_mlpfusion import __version__

    return f"hf-mlpfusion {__version__}"


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # the fast path: no Typer, no rich
        print(version_line())
        return
    from .app import app
    from .common import run

    run(app)  # signal handlers first; any failure is one line and an exit code (cli/common.py)


def __getattr__(name: str):
    if name == "app":  # `from hf_mlpfusion.cli.main import app`, as before the app moved to cli/app.py
        from .app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
