"""Start-up: `import hf_mlpfusion` and the CLI's --help/--version import neither torch nor transformers,
and `import hf_mlpfusion; AutoModel.from_pretrained(fused)` still works whichever is imported first.

Timings are in benchmarks/startup.py; these tests only check what gets imported, in fresh processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

HEAVY = ("torch", "transformers")


def _python(code: str, *args: str, flags: tuple[str, ...] = (), cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *flags, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)


def _heavy_in_importtime(stderr: str) -> list[str]:
    """Modules named in `python -X importtime` output whose top-level package is torch or transformers."""
    names = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return sorted({n for n in names if n.split(".")[0] in HEAVY})


def test_import_hf_mlpfusion_imports_neither_torch_nor_transformers():
    proc = _python("import hf_mlpfusion, hf_mlpfusion.cli.main", flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hf_mlpfusion" in proc.stderr and _heavy_in_importtime(proc.stderr) == []


CLI_RUN = """
import json, sys
sys.argv = ["mlpfusion", *json.loads(sys.argv[1])]
from hf_mlpfusion.cli.main import main
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print(json.dumps([code, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))]), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["-h"], ["compress", "--help"], ["push", "-h"],
                                  ["info", "-h"], ["evaluate", "-h"], ["compress", "--version"]])
def test_help_and_version_import_no_torch(argv):
    proc = _python(CLI_RUN, json.dumps(argv), flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, heavy = json.loads(proc.stderr.strip().splitlines()[-1])
    assert code == 0 and heavy == [], (argv, heavy)
    assert _heavy_in_importtime(proc.stderr) == []
    if "--version" in argv:
        assert proc.stdout.strip() == f"hf-mlpfusion {__import__('hf_mlpfusion').__version__}"
    else:
        assert "Usage: mlpfusion" in proc.stdout


def test_the_installed_entry_point_answers_version():
    exe = Path(sys.executable).parent / "mlpfusion"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hf_mlpfusion.cli.main"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("hf-mlpfusion ") and proc.stderr == ""


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory, one_thread):
    from hf_mlpfusion import FusionConfig, fuse
    from hf_mlpfusion.compress import save_fused

    folder = tmp_path_factory.mktemp("order") / "fused"
    save_fused(fuse(tiny.model("bert", "BertForMaskedLM"), FusionConfig(ratio=0.5, layers=[1])), folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    return folder


ORDERS = {
    "transformers first": "import transformers; from transformers import AutoModelForMaskedLM; import hf_mlpfusion; "
                          "m = AutoModelForMaskedLM.from_pretrained(D)",
    "config and tokenizer only": "import hf_mlpfusion; from transformers import AutoConfig, AutoTokenizer; "
                                 "t = AutoTokenizer.from_pretrained(D); m = AutoConfig.from_pretrained(D); "
                                 "assert type(t).__name__.startswith('Bert'), type(t)",
    "a stock class first": "import hf_mlpfusion; from transformers import BertModel; "
                           "from transformers import AutoModel; m = AutoModel.from_pretrained(D)",
    "the library first": "import hf_mlpfusion; from hf_mlpfusion import fuse, FusionConfig; "
                         "from transformers import AutoModelForMaskedLM; m = AutoModelForMaskedLM.from_pretrained(D)",
    "package (its CLI) first, then a pipeline": "import hf_mlpfusion.cli.main, transformers; "
                                "m = transformers.pipeline('fill-mask', model=D).model",
}


def test_import_order_does_not_matter(fused_dir):
    """Each order in a fresh process (run side by side: each one mostly imports torch and transformers)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for order, code in ORDERS.items():
        script = ("import sys, warnings\nwarnings.simplefilter('error', RuntimeWarning)\n"
                  f"D = {str(fused_dir)!r}\n{code}\nprint(type(m).__module__, type(m).__name__)\n")
        procs[order] = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
    for order, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (order, err[-3000:])
        module, name = out.strip().splitlines()[-1].split()
        assert name.startswith("MLPFusion"), (order, name)
        if not name.endswith("Config"):  # the package's own classes, not the remote code next to the weights
            assert module == "hf_mlpfusion.modeling.modeling_mlpfusion", (order, module)
