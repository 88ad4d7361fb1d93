"""Entry point of the `mlpfusion` command.

It lives outside the `hf_mlpfusion` package on purpose: the signal handlers are in place before
anything of the package or its libraries is imported, and a Ctrl-C (or SIGTERM) while they import
would otherwise print a long traceback from inside an import. Here the signal handlers are in place before that
import, and an interrupt during it ends like one at any later stage: one line, exit 128 + signal.
"""

from __future__ import annotations

import signal
import sys

_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class _Stopped(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


def main() -> None:
    for sig in _SIGNALS:
        signal.signal(sig, _stop)
    if sys.argv[1:] == ["--version"]:  # the fast path: no Typer, no rich, no torch
        from hf_mlpfusion import __version__

        print(f"hf-mlpfusion {__version__}")
        return
    try:
        from hf_mlpfusion.cli.common import run
        from hf_mlpfusion.cli.main import app
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        head = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        red = "\033[1;31m" if sys.stderr.isatty() else ""
        sys.stderr.write(f"{red}{head}:{chr(27) + '[0m' if red else ''} nothing was started; run the command again\n")
        raise SystemExit(128 + int(signum)) from None
    run(app)


if __name__ == "__main__":
    main()
