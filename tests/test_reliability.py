"""Reliability on the inputs users really have: no silent garbage, no lost source, no traceback.

Every failure here must end with one line and the documented exit code (README, "Exit codes"), the
source untouched and nothing left beside the output. One section per case of the issue, in its
order: half precision, damaged tensors, missing tokenizers, signals, the output folder, dead runs'
leftovers, NaN weights, one-line errors, early checks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hf_mlpfusion  # noqa: F401  (registers the fused types)
import hf_mlpfusion.compress as compress_mod
import tiny
from hf_mlpfusion.cli.main import app
from test_evaluate import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --- helpers ------------------------------------------------------------------------------------


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_fails(result, code: int, *needles: str) -> str:
    """Exit `code`, one line, no traceback, the needles in it; returns the line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    got = lines(result.output)
    assert len(got) == 1, result.output
    assert got[0].startswith("error:"), got[0]
    for needle in needles:
        assert needle in got[0], got[0]
    return got[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes (and the folder's own listing)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and any(
        tag in p.name for tag in (".partial-", ".old-", ".probe-")))


def save_with_tokenizer(model, folder: Path, tok, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    tok.save_pretrained(folder)
    return folder


def dtypes_in(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out |= {str(h.get_slice(k).get_dtype()) for k in h.keys()}
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def bert(root, tok):
    return save_with_tokenizer(tiny.model("bert", "BertForMaskedLM"), root / "bert", tok)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty folder to write into (and the current folder), checked to be clean at the end."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def damaged_copy(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    sd = {k: v.clone() for k, v in load_file(src / "model.safetensors").items()}
    change(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# --- 1. half precision: calibration, distillation and evaluation keep the source's dtype ----------


@pytest.fixture(scope="module")
def half(root, tok):
    out = {}
    for dtype in ("float16", "bfloat16"):
        m = tiny.model("bert", "BertForMaskedLM").to(getattr(torch, dtype))
        out[dtype] = save_with_tokenizer(m, root / f"bert-{dtype}", tok)
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("options", [["--calibration", "builtin"], ["--calibration", "builtin", "--data-free"],
                                     ["--distill-steps", "3"]], ids=["calibration", "data-free", "distill-only"])
def test_half_precision_calibration_keeps_the_dtype(half, work, dtype, options):
    src = half[dtype]
    before = snapshot(src)
    result = run("compress", src, "--ratio", "0.5", "-o", work / "out", "--calibration-samples", "8", *options)
    assert result.exit_code == 0, result.output
    assert dtypes_in(work / "out") == {"F16" if dtype == "float16" else "BF16"}
    cfg = json.loads((work / "out" / "config.json").read_text())
    assert cfg["dtype"] == dtype and cfg["mlpfusion"]["calibration"]["tokens"] > 100
    import transformers

    model = transformers.AutoModelForMaskedLM.from_pretrained(work / "out")
    assert model.dtype == getattr(torch, dtype)
    logits = model(**tiny.inputs("BertForMaskedLM")).logits
    assert torch.isfinite(logits.float()).all()
    assert snapshot(src) == before and leftovers(work) == []


def test_half_precision_llama_calibrates(root, tok, work):
    src = save_with_tokenizer(tiny.model("llama", "LlamaForCausalLM").to(torch.bfloat16), root / "llama-bf16", tok)
    result = run("compress", src, "--ratio", "0.5", "-o", work / "out", "--calibration", "builtin",
                 "--calibration-samples", "8", "--distill-steps", "2")
    assert result.exit_code == 0, result.output
    assert dtypes_in(work / "out") == {"BF16"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_evaluate_half_precision(half, work, dtype):
    assert run("compress", half[dtype], "--ratio", "0.5", "-o", work / "out").exit_code == 0
    result = run("evaluate", half[dtype], work / "out", "--samples", "8", "--ntk-examples", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert 0 < report["hidden_relative_error"] < 1 and 0.5 < report["cosine_mean"] <= 1.0001
    assert report["mlm_loss_before"] > 0 and report["mlm_loss_after"] > 0 and len(report["ntk_error"]) == 3


# --- 2. missing, unexpected or mis-shaped tensors stop the run, naming the tensor -----------------

MLP_W = "bert.encoder.layer.1.intermediate.dense.weight"
OUT_W = "bert.encoder.layer.1.output.dense.weight"
DAMAGE = {
    "missing": (lambda sd: sd.pop(MLP_W), MLP_W, "missing"),
    "unexpected": (lambda sd: sd.__setitem__("bert.encoder.layer.1.extra.weight", torch.zeros(3)),
                   "bert.encoder.layer.1.extra.weight", "not part of"),
    "misshaped": (lambda sd: sd.__setitem__(OUT_W, torch.zeros(32, 60)), OUT_W, "[32, 60]"),
    "head-missing": (lambda sd: sd.pop("cls.predictions.transform.dense.weight"),
                     "cls.predictions.transform.dense.weight", "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_damaged_tensors_are_one_line_naming_the_tensor(bert, work, damage, sharded):
    change, name, needle = DAMAGE[damage]
    src = damaged_copy(bert, work / "src", change)
    if sharded:  # the same tensors, split over two shards with an index
        sd = load_file(src / "model.safetensors")
        (src / "model.safetensors").unlink()
        keys = sorted(sd)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for fname, ks in shards.items():
            save_file({k: sd[k] for k in ks}, src / fname, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(src)
    assert_fails(run("compress", src, "-o", work / "out"), 5, name, needle)
    assert not (work / "out").exists() and leftovers(work) == [] and snapshot(src) == before


@pytest.mark.parametrize("damage", ["missing", "misshaped", "head-missing"])
def test_damaged_tensors_are_found_from_the_headers_before_loading(bert, work, damage, monkeypatch):
    change, name, _ = DAMAGE[damage]
    src = damaged_copy(bert, work / "src", change)

    def never(self):
        raise AssertionError("the weights were loaded before the check")

    monkeypatch.setattr(compress_mod.Checkpoint, "load", never)
    assert_fails(run("compress", src, "-o", work / "out"), 5, name)


def test_sharded_checkpoints_load_and_a_missing_shard_is_named(bert, work):
    import transformers

    src = work / "sharded"
    save_with_tokenizer(transformers.BertForMaskedLM.from_pretrained(bert), src, tiny_tokenizer(work / "t"),
                        max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 1
    assert run("compress", src, "-o", work / "out").exit_code == 0
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    assert_fails(run("compress", src, "-o", work / "out2"), 5, shard.name, "missing")
    assert not (work / "out2").exists()


def test_legitimately_absent_or_renamed_tensors_still_load(bert, tok, work):
    """Tied LM heads, legacy LayerNorm names and saved non-persistent buffers are not damage."""
    gpt2 = save_with_tokenizer(tiny.model("gpt2", "GPT2LMHeadModel"), work / "gpt2", tok)  # lm_head tied: absent
    assert run("compress", gpt2, "-o", work / "o1").exit_code == 0

    def legacy(sd):
        for k in [k for k in sd if "LayerNorm." in k]:
            sd[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = sd.pop(k)
        sd["bert.embeddings.position_ids"] = torch.arange(64)[None]

    old = damaged_copy(bert, work / "legacy", legacy)
    result = run("compress", old, "-o", work / "o2")
    assert result.exit_code == 0, result.output


def test_evaluate_refuses_a_damaged_model_too(bert, work):
    src = damaged_copy(bert, work / "src", DAMAGE["missing"][0])
    assert_fails(run("evaluate", bert, src, "--samples", "4"), 5, MLP_W)


# --- 3. no tokenizer: refused wherever text must be tokenised -------------------------------------


@pytest.fixture(scope="module")
def no_tok(root):
    folder = root / "no-tokenizer"
    tiny.model("bert", "BertForMaskedLM").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("options", [["--calibration", "builtin"], ["--distill-steps", "2"],
                                     ["--calibration", "builtin", "--data-aware"]])
def test_calibration_without_tokenizer_files_is_refused(no_tok, work, options):
    before = snapshot(no_tok)
    assert_fails(run("compress", no_tok, "-o", work / "out", *options), 1, "no tokenizer files", str(no_tok))
    assert not (work / "out").exists() and snapshot(no_tok) == before


def test_a_tokenizer_config_without_vocabulary_is_refused(no_tok, bert, work):
    src = work / "src"
    shutil.copytree(no_tok, src)
    shutil.copy(bert / "tokenizer_config.json", src)
    assert_fails(run("compress", src, "-o", work / "out", "--calibration", "builtin"), 1, "no tokenizer files")


def test_a_tokenizer_that_knows_none_of_the_text_is_refused(no_tok, work):
    from transformers import BertTokenizer

    src = work / "src"
    shutil.copytree(no_tok, src)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"zq{i}" for i in range(95)]
    (work / "v.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(work / "v.txt")).save_pretrained(src)
    assert_fails(run("compress", src, "-o", work / "out", "--calibration", "builtin"), 1, "unknown tokens")


def test_data_free_compress_needs_no_tokenizer(no_tok, work):
    assert run("compress", no_tok, "-o", work / "out").exit_code == 0


def test_evaluate_without_any_tokenizer_is_refused(no_tok, work):
    assert run("compress", no_tok, "-o", work / "out").exit_code == 0
    assert_fails(run("evaluate", no_tok, work / "out", "--samples", "4"), 1, "tokenizer")


# --- 4. signals: one line, 128 + N, nothing left, within seconds, at every stage ------------------

WRAPPER = r'''
import os, sys, time
stage, ready = sys.argv[1], sys.argv[2]

def pause():
    open(ready, "w").close()
    time.sleep(120)  # the signal must cut this short: the test waits far less

if stage == "load":  # inside transformers' weight loading, where a loader thread pool swallowed Ctrl-C
    import transformers.core_model_loading as cml
    orig, n = cml._materialize_copy, [0]
    def slow(*a, **k):
        n[0] += 1
        if n[0] == 3:
            pause()
        return orig(*a, **k)
    cml._materialize_copy = slow
elif stage == "stream":  # the streaming compress, between two layer groups
    import hf_mlpfusion.io.stream as st
    orig_group = st.reduce_group
    st.reduce_group = lambda *a, **k: (pause(), orig_group(*a, **k))[1]
elif stage in ("fuse", "save"):
    import hf_mlpfusion.compress as c
    if stage == "fuse":
        orig_fuse = c.fuse
        c.fuse = lambda *a, **k: (pause(), orig_fuse(*a, **k))[1]
    else:  # the partial folder is complete on disk, the rename not done
        orig_save = c.save_fused
        c.save_fused = lambda m, f, **k: (orig_save(m, f, **k), pause())[0]
sys.argv = ["mlpfusion"] + sys.argv[3:]
from mlpfusion_launcher import main
main()
'''


def start_cli(tmp: Path, stage: str, *args) -> tuple[subprocess.Popen, Path]:
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    ready = tmp / f"ready-{stage}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script), stage, str(ready), *map(str, args)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def wait_for(proc, ready: Path, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "the command never reached the stage"
        time.sleep(0.05)


@pytest.mark.parametrize("stage,sig", [("load", signal.SIGINT), ("fuse", signal.SIGINT), ("save", signal.SIGINT),
                                       ("save", signal.SIGTERM), ("stream", signal.SIGINT)])
def test_a_signal_at_any_stage_is_one_line_and_leaves_nothing(bert, tmp_path, stage, sig):
    before = snapshot(bert)
    path = [] if stage == "stream" else ["--in-memory"]  # data-free compress streams by default
    proc, ready = start_cli(tmp_path, stage, "compress", bert, "-o", tmp_path / "out", *path)
    wait_for(proc, ready)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)  # the paused stage sleeps 120 s: only the signal ends it sooner
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert len(lines(err)) == 1 and lines(err)[0].startswith(("interrupted:", "stopped by SIGTERM:")), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert snapshot(bert) == before


def test_ctrl_c_while_the_libraries_import_is_one_line(bert, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "from mlpfusion_launcher import main; main()", "compress",
                             str(bert), "-o", str(tmp_path / "out")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # torch and transformers take seconds to import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(lines(err)) == 1 and lines(err)[0].startswith("interrupted"), err
    assert not (tmp_path / "out").exists()


def test_a_swallowed_interrupt_still_stops_before_the_output_is_renamed(bert, work, monkeypatch):
    """Some libraries catch KeyboardInterrupt ('Exception ignored in ...'): the signal is remembered."""
    from hf_mlpfusion import errors

    real = compress_mod.save_fused

    def swallowing(*a, **k):
        real(*a, **k)
        errors.note_signal(signal.SIGINT)  # what the handler does before raising, and the raise got lost

    monkeypatch.setattr(compress_mod, "save_fused", swallowing)
    try:
        result = run("compress", bert, "-o", work / "out")
    finally:
        errors.reset_signals()
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not (work / "out").exists() and leftovers(work) == []


# --- 5. the output folder: never the source, only our own checkpoints replaced --------------------


def test_output_that_is_inside_or_holds_the_source_is_refused(bert, work):
    src = work / "inp"
    shutil.copytree(bert, src)
    before = snapshot(src)
    for out, how in [(src, "is the source"), (src / "sub", "lies inside"), (work, "contains")]:
        for extra in ([], ["--overwrite"]):
            assert_fails(run("compress", src, "-o", out, *extra), 1, how, "never replaced")
    (work / "link").symlink_to(src)
    assert_fails(run("compress", src, "-o", work / "link", "--overwrite"), 1, "is the source")
    assert snapshot(src) == before and leftovers(work) == []


def test_overwrite_replaces_only_a_checkpoint_this_tool_wrote(bert, work):
    mine = work / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    assert_fails(run("compress", bert, "-o", mine, "--overwrite"), 1, "not one", "no config.json")
    other = work / "other-model"
    shutil.copytree(bert, other)
    assert_fails(run("compress", bert, "-o", other, "--overwrite"), 1, "no 'mlpfusion' entry")
    assert (mine / "thesis.txt").read_text() == "years of work" and (other / "model.safetensors").is_file()
    empty = work / "empty"
    empty.mkdir()
    assert run("compress", bert, "-o", empty, "--overwrite").exit_code == 0
    assert run("compress", bert, "--ratio", "0.5", "-o", empty, "--overwrite").exit_code == 0
    assert json.loads((empty / "config.json").read_text())["mlpfusion"]["ratio"] == 0.5
    assert leftovers(work) == []


def test_an_empty_folder_made_for_the_output_needs_no_overwrite(bert, work, monkeypatch):
    """`mkdir out && mlpfusion compress -o out` loses nothing, so it is no mistake; a link to an empty
    folder, the current folder, and a folder something fills during the run still are."""
    out = work / "out"
    out.mkdir()
    assert run("compress", bert, "-o", out).exit_code == 0
    assert (out / "model.safetensors").is_file() and leftovers(work) == []
    assert_fails(run("compress", bert, "-o", out), 1, "already exists", "--overwrite")  # now it holds a checkpoint
    (work / "target").mkdir()
    (work / "link").symlink_to(work / "target")
    assert_fails(run("compress", bert, "-o", work / "link"), 1, "already exists")
    here = work / "here"
    here.mkdir()
    os.chdir(here)
    assert_fails(run("compress", bert, "-o", "."), 1, "current folder", "choose another --output")
    os.chdir(work)
    assert list(here.iterdir()) == [] and list((work / "target").iterdir()) == []

    filled = work / "filled"
    filled.mkdir()
    real_fuse = compress_mod.fuse

    def fuse_while_someone_writes(*args, **kwargs):
        (filled / "notes.txt").write_text("mine")
        return real_fuse(*args, **kwargs)

    monkeypatch.setattr(compress_mod, "fuse", fuse_while_someone_writes)
    assert_fails(run("compress", bert, "-o", filled, "--in-memory"), 1, "filled while compressing")
    assert [p.name for p in filled.iterdir()] == ["notes.txt"] and leftovers(work) == []


def test_overwrite_of_the_current_folder_is_refused(bert, work):
    out = work / "out"
    assert run("compress", bert, "-o", out).exit_code == 0
    os.chdir(out)
    assert_fails(run("compress", bert, "-o", ".", "--overwrite"), 1, "current folder")
    assert (out / "model.safetensors").is_file()


def test_a_failed_replacement_puts_the_old_output_back(bert, work, monkeypatch):
    out = work / "out"
    assert run("compress", bert, "-o", out).exit_code == 0
    before = snapshot(out)
    real_rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".out.partial-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    assert_fails(run("compress", bert, "--ratio", "0.5", "-o", out, "--overwrite"), 6, "Input/output error")
    assert snapshot(out) == before and leftovers(work) == []


# --- 6. leftovers of runs that died (SIGKILL, the OOM killer) are cleaned by the next run ---------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigkill_during_save_leaves_a_partial_that_the_next_run_removes(bert, tmp_path):
    proc, ready = start_cli(tmp_path, "save", "compress", bert, "-o", tmp_path / "out")
    wait_for(proc, ready)
    proc.kill()
    proc.communicate(timeout=60)
    left = leftovers(tmp_path)
    assert left == [f".out.partial-{proc.pid}"]  # what a SIGKILL leaves: nothing can run on it
    again = run("compress", bert, "-o", tmp_path / "out")  # the next run, in this process
    assert again.exit_code == 0, again.output
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").is_file()


def test_stale_partials_are_cleaned_and_live_or_foreign_ones_kept(bert, work):
    dead = dead_pid()
    stale = work / f".out.partial-{dead}"
    stale.mkdir()
    probe = work / f".out.probe-{dead}"  # killed while checking that the folder is writable
    probe.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = work / f".out.partial-{os.getppid()}"  # a live process (pytest's parent): maybe still writing
    live.mkdir()
    other_ours = work / f".another.partial-{dead}"  # another output's, with this tool's marker
    other_ours.mkdir()
    (other_ours / ".mlpfusion-partial").write_text(json.dumps({"pid": dead, "host": os.uname().nodename}))
    foreign = work / f".someone-elses.partial-{dead}"  # no marker, another name: not provably ours
    foreign.mkdir()
    elsewhere = work / f".shared.partial-{dead}"  # ours, but written from another machine
    elsewhere.mkdir()
    (elsewhere / ".mlpfusion-partial").write_text(json.dumps({"pid": dead, "host": "another-host"}))
    assert run("compress", bert, "-o", work / "out").exit_code == 0
    assert not stale.exists() and not other_ours.exists() and not probe.exists()
    assert live.exists() and foreign.exists() and elsewhere.exists()


def test_a_replaced_output_left_by_a_dead_run_is_put_back(bert, work):
    assert run("compress", bert, "-o", work / "out").exit_code == 0
    dead = dead_pid()
    (work / "out").rename(work / f".out.old-{dead}")  # killed between the two renames of a replacement
    assert_fails(run("compress", bert, "-o", work / "out"), 1, "already exists")  # it is back
    assert (work / "out" / "model.safetensors").is_file() and leftovers(work) == []


def test_overwriting_an_output_that_is_a_symlink_replaces_the_link_and_leaves_nothing(bert, work):
    assert run("compress", bert, "-o", work / "target").exit_code == 0
    before = snapshot(work / "target")
    (work / "link").symlink_to(work / "target")
    assert run("compress", bert, "-o", work / "link", "--overwrite", "--seed", "1").exit_code == 0
    assert not (work / "link").is_symlink() and (work / "link" / "model.safetensors").is_file()
    assert snapshot(work / "target") == before  # the link's target is the user's: never touched
    assert leftovers(work) == []
    dead = dead_pid()  # a run that died after replacing a link leaves it beside the output
    (work / f".link.old-{dead}").symlink_to(work / "target")
    assert run("compress", bert, "-o", work / "link", "--overwrite").exit_code == 0
    assert leftovers(work) == [] and snapshot(work / "target") == before


# --- 7. NaN or inf weights are refused -----------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused(bert, work, value):
    src = damaged_copy(bert, work / "src", lambda sd: sd[OUT_W].__setitem__((0, 0), value))
    line = assert_fails(run("compress", src, "-o", work / "out"), 5, OUT_W)
    assert ("NaN" in line) == (value != value)
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_fusion_that_overflows_its_dtype_is_not_written(bert, work, monkeypatch):
    real = compress_mod.fuse

    def overflowing(*a, **k):
        fused = real(*a, **k)
        with torch.no_grad():
            next(fused.parameters())[0, 0] = float("inf")
        return fused

    monkeypatch.setattr(compress_mod, "fuse", overflowing)
    assert_fails(run("compress", bert, "-o", work / "out", "--in-memory"), 5, "infinite")
    assert not (work / "out").exists()


def test_a_streamed_fusion_that_overflows_is_not_written(bert, work, monkeypatch):
    import hf_mlpfusion.io.stream as stream_mod

    real = stream_mod.reduction_entries

    def overflowing(*a, **k):
        entries = real(*a, **k)
        first = next(iter(entries))
        entries[first] = entries[first].clone().fill_(float("inf"))
        return entries

    monkeypatch.setattr(stream_mod, "reduction_entries", overflowing)
    assert_fails(run("compress", bert, "-o", work / "out", "--streaming"), 5, "infinite")
    assert not (work / "out").exists()


# --- 8. one line instead of a traceback ----------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "meta", "xla", "cuda:7", "nonsense"])
def test_unsupported_devices_are_one_line(bert, work, device, monkeypatch):
    def never(self):
        raise AssertionError("loaded before the device was checked")

    monkeypatch.setattr(compress_mod.Checkpoint, "load", never)
    assert_fails(run("compress", bert, "-o", work / "out", "--device", device), 1, "device")


def test_unwritable_outputs_are_one_line(bert, work):
    assert_fails(run("compress", bert, "-o", "/proc/out"), 6, "/proc")
    assert_fails(run("compress", bert, "-o", work / "no" / "such" / "out"), 1, "does not exist")
    (work / "notes.txt").write_text("a file\n")
    assert_fails(run("compress", bert, "-o", work / "notes.txt" / "sub" / "out"), 1, "notes.txt is a file")
    assert (work / "notes.txt").read_text() == "a file\n"


def full_disk(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("how,route", [("oserror", "--in-memory"), ("writer", "--in-memory"), ("writer", "--streaming"),
                                       ("safetensors", "--in-memory")])
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(bert, work, monkeypatch, how, route):
    import transformers

    import hf_mlpfusion.io.save as save_mod

    if how == "oserror":
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    elif how == "writer":  # the sharded writer both routes share

        def pwrite_full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("hf_mlpfusion.io.writer.os.pwrite", pwrite_full)
    else:  # a model the writer cannot stream falls back to save_pretrained, and safetensors reports it
        # with its own exception type, not an OSError

        def not_streamable(model):
            raise save_mod.NotStreamable("test")

        def safetensors_full(*a, **k):
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(save_mod, "_saved_state", not_streamable)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safetensors_full)
    assert_fails(run("compress", bert, "-o", work / "out", route), 6, "No space left on device", "free some space")
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_real_full_disk_in_a_tiny_tmpfs(bert, tmp_path):
    """A 48 KB tmpfs mounted in a user namespace: the real kernel error, the real writers."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a tmpfs in; the monkeypatched tests above cover it")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=48k tmpfs {disk} && {sys.executable} -c "
              f"'from mlpfusion_launcher import main; main()' compress {bert} -o {disk}/out; "
              f"echo rc=$?; ls -A {disk}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "rc=6" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("rc=6"), proc.stdout  # `ls -A` of the disk printed nothing
    assert "Traceback" not in proc.stderr and lines(proc.stderr)[-1].startswith("error:"), proc.stderr
    assert len(lines(proc.stderr)) == 1, proc.stderr


def test_evaluate_two_models_of_one_family_but_different_shapes(tok, work):
    a = save_with_tokenizer(tiny.model("bert", "BertForMaskedLM"), work / "a", tok)
    b = save_with_tokenizer(tiny.model("bert", "BertForMaskedLM", hidden=16), work / "b", tok)
    assert_fails(run("evaluate", a, b, "--samples", "4"), 1, "hidden size", "32", "16")
    c = save_with_tokenizer(tiny.model("bert", "BertForMaskedLM", layers=2), work / "c", tok)
    assert_fails(run("evaluate", a, c, "--samples", "4"), 1, "number of layers")
    d = save_with_tokenizer(tiny.model("gpt2", "GPT2LMHeadModel"), work / "d", tok)
    assert_fails(run("evaluate", a, d, "--samples", "4"), 1, "different families (bert and gpt2)")


def test_an_unexpected_exception_is_one_line_with_exit_70(bert, work, monkeypatch):
    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(compress_mod, "fuse", bug)
    assert_fails(run("compress", bert, "-o", work / "out", "--in-memory"), 70, "internal error", "ZeroDivisionError", "MLPFUSION_TRACEBACK")
    monkeypatch.setenv("MLPFUSION_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        runner.invoke(app, ["compress", str(bert), "-o", str(work / "out2"), "--in-memory"], catch_exceptions=False)


def test_out_of_memory_is_one_line_with_exit_6(bert, work, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(compress_mod, "fuse", oom)
    assert_fails(run("compress", bert, "-o", work / "out", "--in-memory"), 6, "out of memory")


def test_push_shares_the_error_mapping(work):
    assert_fails(run("push", work / "nothing-here", "org/name"), 1)


# --- 9. fast and right: no Hub look-up for a typo, options checked before loading -----------------


def test_a_legacy_hub_id_without_an_org_is_still_a_hub_id(work, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert_fails(run("compress", "gpt2", "-o", work / "out"), 4, "could not download gpt2")
    assert_fails(run("compress", "gpt2/", "-o", work / "out"), 1, "no such folder")


@pytest.mark.parametrize("command", ["compress", "info", "evaluate", "evaluate --card"])
def test_every_command_reads_a_model_argument_by_one_rule(bert, work, monkeypatch, command):
    """A file is "a file", a path-shaped name that is not there (here "gpt2/") is "no such folder",
    in every command that takes a model, and neither becomes a Hub download."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    a_file = work / "weights.safetensors"
    a_file.write_bytes(b"not a folder")

    def args(model):
        name, *flags = command.split()
        if name == "compress":
            return [name, model, "-o", work / "out", *flags]
        if name == "info":
            return [name, model, *flags]
        return [name, bert, model, "--samples", "4", *flags]

    assert_fails(run(*args(a_file)), 1, "is a file", "give the folder")
    assert_fails(run(*args("gpt2/")), 1, "no such folder", "gpt2/")
    assert_fails(run(*args("")), 1, "empty string")  # not the current folder
    assert not (work / "out").exists()


def test_evaluate_with_the_two_checkpoints_swapped_says_so(bert, work):
    fused = work / "fused"
    assert run("compress", bert, "--ratio", "0.5", "-o", fused).exit_code == 0
    line = assert_fails(run("evaluate", fused, bert, "--samples", "4"), 1, "swapped", "is an MLP-fused checkpoint")
    assert f"mlpfusion evaluate {bert} {fused}" in line
    assert run("evaluate", bert, fused, "--samples", "4", "--ntk-examples", "0").exit_code == 0
    # two fused checkpoints (one against another) are not a mistake
    assert run("evaluate", fused, fused, "--samples", "4", "--ntk-examples", "0").exit_code == 0


def test_a_typo_in_evaluate_is_no_such_folder_at_once(bert, work):
    assert_fails(run("evaluate", bert, work / "fused-typo", "--samples", "4"), 1, "no such folder", "fused-typo")
    assert_fails(run("evaluate", "bert-typo", bert, "--samples", "4"), 1, "no such folder", "bert-typo")


@pytest.mark.parametrize("args,needle", [
    (["--ratio", "0.001"], "leaves no neuron"),
    (["--intermediate-size", "65"], "larger than"),
    (["--layers", "0,7"], "out of range"),
    (["--layers", ""], "empty"),
    (["--layers", " , "], "bad layer list"),
    (["--calibration", "no-such-file.txt"], "not found"),
    (["--calibration", ""], "--calibration is empty"),  # not the current folder read as text
    (["--calibration", "builtin", "--calibration-samples", "0"], "calibration samples"),
    (["--calibration-samples", "8"], "--calibration-samples sizes the calibration text"),  # it would do nothing
    (["--distill-steps", "-1"], "distill steps"),
    (["--device", "mps"], "device"),
    (["--data-aware"], "calibration text"),
])
def test_options_are_checked_before_the_model_loads(bert, work, monkeypatch, args, needle):
    def never(self):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(compress_mod.Checkpoint, "load", never)
    assert_fails(run("compress", bert, "-o", work / "out", *args), 1, needle)
    assert not (work / "out").exists()


def test_a_config_without_model_type_says_so(bert, work):
    src = work / "src"
    shutil.copytree(bert, src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["model_type"]
    (src / "config.json").write_text(json.dumps(cfg))
    line = assert_fails(run("compress", src, "-o", work / "out"), 1, "has no model_type")
    assert "None" not in line
    assert_fails(run("evaluate", bert, src), 1, "has no model_type")


# --- found by the fuzz test (tests/test_fuzz_cli.py) ---------------------------------------------


def test_allow_pickle_on_a_safetensors_checkpoint_still_reads_the_safetensors(bert, work):
    result = run("compress", bert, "--allow-pickle", "-o", work / "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,needle", [(["--max-length", "1"], "at least 3"), (["--max-length", "2"], "at least 3"),
                                        (["--max-length", "0"], ">= 1"), (["--max-length", "-5"], ">= 1"),
                                        (["--ntk-examples", "-1"], "ntk examples")])
def test_evaluate_lengths_below_the_special_tokens_and_negative_counts_are_one_line(bert, work, args, needle):
    assert run("compress", bert, "--ratio", "0.5", "-o", work / "out").exit_code == 0
    assert_fails(run("evaluate", bert, work / "out", "--samples", "4", *args), 1, needle)


def test_the_readme_exit_code_table_is_the_one_the_code_uses():
    import re

    from hf_mlpfusion import errors
    from hf_mlpfusion.hub import HubAuthError, HubError, HubNetworkError

    text = (REPO / "README.md").read_text().split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    documented = {int(c) for row in re.findall(r"^\| ([\d, ]+) \|", text, re.M) for c in row.split(",")}
    classes = [errors.ModelNotFoundError, errors.UnsupportedArchitectureError, errors.InvalidConfigError,
               errors.OutputExistsError, errors.CorruptCheckpointError, errors.UnsafeCheckpointError,
               errors.NetworkError, errors.OutputWriteError, HubError, HubAuthError, HubNetworkError]
    used = {c.exit_code for c in classes} | {errors.EXIT_OK, errors.EXIT_USAGE, errors.EXIT_INTERNAL}
    used |= {errors.Interrupted(s).exit_code for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert documented == used == {0, 1, 2, 3, 4, 5, 6, 70, 130, 143, 129}


def test_a_message_with_newlines_is_still_one_line(bert, work, monkeypatch):
    from hf_mlpfusion.errors import InvalidConfigError

    def multiline(*a, **k):
        raise InvalidConfigError("the server said:\n  first\n\n  second")

    monkeypatch.setattr(compress_mod, "fuse", multiline)
    assert_fails(run("compress", bert, "-o", work / "out", "--in-memory"), 1, "the server said: first second")


def test_a_data_file_without_its_text_column_names_the_flag_that_picks_it(bert, work):
    data = work / "reviews.csv"
    data.write_text("label,review\n1,a great film about the sea\n0,awful and long\n")
    line = assert_fails(run("compress", bert, "-o", work / "out", "--calibration", data, "--calibration-samples", "2"),
                        1, "--calibration-column", "it has label, review")
    assert not (work / "out").exists() and "column=" in line  # the Python spelling too, for library users
    result = run("compress", bert, "-o", work / "out", "--calibration", data, "--calibration-column", "review",
                 "--calibration-samples", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((work / "out" / "config.json").read_text())["mlpfusion"]["calibration"]["samples"] == 2
