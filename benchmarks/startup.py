"""Start-up time of the CLI and of `import hf_mlpfusion`, each in fresh processes.

    python benchmarks/startup.py                       # this checkout
    python benchmarks/startup.py --before OLD_TREE     # and a second source tree side by side, e.g.
        mkdir /tmp/before && git archive 3dfa8bd hf_mlpfusion | tar -x -C /tmp/before

Every row is run `--repeats` times (interleaved with the other rows, so a busy machine slows them
alike); the table gives the median and the fastest wall time, and whether torch / transformers
were imported (from `python -X importtime`). The target: `mlpfusion --version` under 0.5 s, and
neither `--help` nor `--version` importing torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("python -c pass (the interpreter alone)", ["-c", "pass"]),
    ("mlpfusion --version", ["-m", "hf_mlpfusion.cli.main", "--version"]),
    ("mlpfusion --help", ["-m", "hf_mlpfusion.cli.main", "--help"]),
    ("mlpfusion compress --help", ["-m", "hf_mlpfusion.cli.main", "compress", "--help"]),
    ("import hf_mlpfusion", ["-c", "import hf_mlpfusion"]),
    ("import hf_mlpfusion; transformers.AutoModel", ["-c", "import hf_mlpfusion, transformers; transformers.AutoModel"]),
    ("import torch (for scale)", ["-c", "import torch"]),
]


def _env(tree: Path | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def _once(args: list[str], env: dict, cwd: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True)
    return time.perf_counter() - t0, proc.returncode


def _heavy(args: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, cwd=cwd, capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
             if line.startswith("import time:")}
    return ", ".join(n for n in ("torch", "transformers") if n in names) or "neither"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--before", type=Path, help="another source tree (its hf_mlpfusion/) to time side by side")
    args = parser.parse_args()

    trees = {"this checkout": None}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "mlpfusion-startup"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)  # run outside the checkout, so `python -m` finds the tree we mean

    times: dict[tuple[str, str], list[float]] = {}
    codes: dict[tuple[str, str], int] = {}
    for _ in range(args.repeats):
        for tree_name, tree in trees.items():
            env = _env(tree) if tree is not None else {**_env(None), "PYTHONPATH": str(ROOT)}
            for name, cmd in CASES:
                wall, code = _once(cmd, env, work)
                times.setdefault((tree_name, name), []).append(wall)
                codes[(tree_name, name)] = code

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load:.2f}, {args.repeats} runs each\n")
    print("| command | tree | median (s) | fastest (s) | imports |")
    print("|---|---|---:|---:|---|")
    for name, cmd in CASES:
        for tree_name, tree in trees.items():
            env = _env(tree) if tree is not None else {**_env(None), "PYTHONPATH": str(ROOT)}
            walls = times[(tree_name, name)]
            status = "" if codes[(tree_name, name)] == 0 else f" (exit {codes[(tree_name, name)]})"
            print(f"| `{name}` | {tree_name} | {statistics.median(walls):.3f}{status} | {min(walls):.3f} | "
                  f"{_heavy(cmd, env, work)} |")
    exe = Path(sys.executable).parent / "mlpfusion"
    if exe.exists():  # the installed console script, as users run it
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([str(exe), "--version"], capture_output=True, env=_env(None), cwd=work)
            walls.append(time.perf_counter() - t0)
        heavy = _heavy([str(exe), "--version"], _env(None), work)
        print(f"| `mlpfusion --version` (installed entry point) | this checkout | {statistics.median(walls):.3f} | "
              f"{min(walls):.3f} | {heavy} |")


if __name__ == "__main__":
    main()
