"""Fuzz the CLI's options: random combinations of valid and invalid values on tiny models.

A fixed seed and a bounded number of cases, each run in-process through the real entry path
(`cli.common.run`, what `mlpfusion` runs after the launcher). Whatever the combination, it must
end one of two ways:

- exit 0, and the output is a complete, loadable checkpoint written by this tool, in a place it was
  allowed to write (a new folder, or one of its own with --overwrite);
- a documented non-zero exit (1, 2, 5 or 6) with exactly one line on stderr starting 'error:' and no
  traceback, the output left as it was.

And in every case: the sources are byte-for-byte unchanged and no partial folder is left anywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

import hf_mlpfusion  # noqa: F401
import tiny
from hf_mlpfusion.cli.common import HANDLED_SIGNALS, run
from hf_mlpfusion.cli.main import app
from test_evaluate import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 20261201
CASES = 60  # about 30 s on a busy 2-core machine
EXIT_CODES = {1, 2, 5, 6}

# option -> (valid values, invalid values); a value is invalid with probability INVALID
COMPRESS_VALUES = {
    "--ratio": (["0.25", "0.5", "1"], ["0", "-1", "1.5", "abc", "nan", "0.001", "inf"]),
    "--intermediate-size": (["8", "64"], ["0", "65", "-4", "x"]),
    "--layers": (["0", "1-2", "0,2", "all"], ["", "5", "2-1", "a", "0-99", " , ", "-1"]),
    "--seed": (["0", "3"], ["-1", "x", "99999999999999999999"]),
    "--device": (["cpu", "auto"], ["mps", "meta", "cuda:9", "gpu", ""]),
    "--method": (["fusion", "cluster", "prune", "sketch"], ["magic"]),
    "--n-init": (["1", "2"], ["0", "-3"]),
    "--max-iter": (["0", "5"], ["-1"]),
    "--calibration": (["builtin", "TEXT"], ["missing.txt", "EMPTY"]),
    "--calibration-samples": (["4"], ["0", "-2", "many"]),
    "--distill-steps": (["0", "2"], ["-1", "two"]),
}
COMPRESS_FLAGS = ["--fold-scale", "--data-aware", "--data-free", "--overwrite", "--allow-pickle"]
OUTPUTS = ["fresh"] * 6 + ["ours", "ours", "empty-dir", "foreign", "source", "inside-source", "file", "proc",
                           "missing-parent"]
EVALUATE_VALUES = {
    "--samples": (["4", "6"], ["0", "-1", "x"]),
    "--ntk-examples": (["0", "2"], ["-1"]),
    "--max-length": (["16", "1"], ["0", "-5"]),
    "--text": (["TEXT"], ["EMPTY", "missing.txt"]),
    "--seed": (["0", "5"], ["-1", "x"]),
}
INVALID = 0.2


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def leftovers(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders if f.is_dir() for p in f.iterdir()
                  if p.name.startswith(".") and any(t in p.name for t in (".partial-", ".old-", ".probe-")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    tok = tiny_tokenizer(root / "tok")
    sources = {}
    for name, model in [("bert", tiny.model("bert", "BertForMaskedLM")),
                        ("gpt2", tiny.model("gpt2", "GPT2LMHeadModel")),
                        ("llama-bf16", tiny.model("llama", "LlamaForCausalLM").to(torch.bfloat16))]:
        model.save_pretrained(root / "src" / name)
        tok.save_pretrained(root / "src" / name)
        sources[name] = root / "src" / name
    tiny.model("bert", "BertForMaskedLM", seed=1).save_pretrained(root / "src" / "bert-no-tokenizer")
    sources["bert-no-tokenizer"] = root / "src" / "bert-no-tokenizer"
    (root / "text.txt").write_text("the value of the object is returned\nan instance of a class\n" * 4)
    (root / "empty.txt").write_text("\n\n")
    return root, sources


def invoke(args: list[str], capsys) -> tuple[int, str, str]:
    saved = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    try:
        with pytest.raises(SystemExit) as done:
            run(app, [str(a) for a in args])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    out, err = capsys.readouterr()
    code = done.value.code
    return (0 if code is None else int(code)), out, err


def fill(value: str, root: Path) -> str:
    return {"TEXT": str(root / "text.txt"), "EMPTY": str(root / "empty.txt")}.get(value, value)


def pick(rng, table, option):
    valid, invalid = table[option]
    return rng.choice(invalid if rng.random() < INVALID else valid)


def make_cases():
    rng = random.Random(SEED)
    cases = []
    for i in range(CASES):
        if rng.random() < 0.2:
            opts = rng.sample(sorted(EVALUATE_VALUES), rng.randint(0, 3))
            args = [x for o in opts for x in (o, pick(rng, EVALUATE_VALUES, o))]
            if rng.random() < 0.3:
                args.append("--json")
            fused = rng.choice(["ours", "ours", "ours", "source", "missing", "gpt2"])
            cases.append(("evaluate", "bert", fused, args))
            continue
        source = rng.choice(["bert", "bert", "gpt2", "llama-bf16", "bert-no-tokenizer"])
        opts = rng.sample(sorted(COMPRESS_VALUES), rng.randint(0, 4))
        if "--ratio" in opts and "--intermediate-size" in opts and rng.random() < 0.8:
            opts.remove("--intermediate-size")  # mostly one of the two, as people write it
        args = [x for o in opts for x in (o, pick(rng, COMPRESS_VALUES, o))]
        args += rng.sample(COMPRESS_FLAGS, rng.choice([0, 0, 1, 2]))
        if ("--calibration" in args or "--distill-steps" in args) and "--calibration-samples" not in args:
            args += ["--calibration-samples", "4"]  # keep calibration cheap
        cases.append(("compress", source, rng.choice(OUTPUTS), args))
    return cases


CASE_LIST = make_cases()


def prepare_output(kind: str, case_dir: Path, source: Path, ours: Path) -> Path:
    out = case_dir / "out"
    if kind == "ours":
        shutil.copytree(ours, out)
    elif kind == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("not a checkpoint")
    elif kind == "file":
        out.write_text("a file")
    elif kind == "empty-dir":
        out.mkdir()
    elif kind == "source":
        return source
    elif kind == "inside-source":
        return source / "sub"
    elif kind == "proc":
        return Path("/proc/mlpfusion-out")
    elif kind == "missing-parent":
        return case_dir / "no" / "such" / "out"
    return out


def check_failure(code: int, out: str, err: str, args) -> None:
    assert code in EXIT_CODES, (code, args, out, err)
    assert "Traceback" not in out + err, (args, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), (args, err)


@pytest.fixture(scope="module")
def ours(world, tmp_path_factory):
    """A fused checkpoint of the bert source, written by this tool (for --overwrite and evaluate)."""
    root, sources = world
    folder = tmp_path_factory.mktemp("ours") / "fused"
    from hf_mlpfusion import FusionConfig
    from hf_mlpfusion.compress import compress

    compress(str(sources["bert"]), FusionConfig(ratio=0.5), folder)
    return folder


@pytest.mark.parametrize("case", range(CASES))
def test_fuzz_cli(world, ours, tmp_path, capsys, monkeypatch, case):
    root, sources = world
    command, source_name, kind, raw = CASE_LIST[case]
    args = [fill(a, root) for a in raw]
    monkeypatch.chdir(tmp_path)
    before = {name: snapshot(path) for name, path in sources.items()}
    if command == "evaluate":
        fused = {"ours": ours, "source": sources["bert"], "missing": tmp_path / "missing",
                 "gpt2": sources["gpt2"]}[kind]
        code, out, err = invoke(["evaluate", sources[source_name], fused, *args], capsys)
        if code == 0:
            assert out.strip(), (args, err)
            if "--json" in args:
                report = json.loads(out)
                assert report["samples"] >= 1 and report["hidden_relative_error"] is not None
        else:
            check_failure(code, out, err, args)
    else:
        source = sources[source_name]
        output = prepare_output(kind, tmp_path, source, ours)
        state = snapshot(output)
        code, out, err = invoke(["compress", source, "-o", output, *args], capsys)
        if code == 0:
            assert kind in ("fresh", "ours", "empty-dir"), (kind, args)
            assert kind in ("fresh", "empty-dir") or "--overwrite" in args, (kind, args)  # an empty folder loses nothing
            cfg = json.loads((output / "config.json").read_text())
            assert cfg["mlpfusion"]["source_model"] == Path(source).name  # a local source: its folder name, never its path
            import transformers

            model = transformers.AutoModel.from_pretrained(output)
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state
            assert torch.isfinite(hidden.float()).all()
            assert model.dtype == (torch.bfloat16 if source_name == "llama-bf16" else torch.float32)
        else:
            check_failure(code, out, err, args)
            if kind != "proc":
                assert snapshot(output) == state, (kind, args, err)
    assert {name: snapshot(path) for name, path in sources.items()} == before, (command, kind, args)
    assert leftovers(tmp_path, root / "src", *sources.values()) == [], args
