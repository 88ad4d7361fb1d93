"""The `mlpfusion` CLI: the happy path, same bytes for the same seed, and every user mistake."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hf_mlpfusion.compress as compress_mod
import tiny
from hf_mlpfusion.cli.main import app

runner = CliRunner()


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "tiny-bert"
    tiny.model("bert", "BertForMaskedLM").save_pretrained(folder)
    return folder


def assert_one_line_error(result, *needles, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "error:" in text
    for needle in needles:
        assert needle in text, text


def test_compress_prints_table_and_writes_a_checkpoint(bert_dir, tmp_path):
    out = tmp_path / "fused"
    result = run("compress", bert_dir, "--ratio", "0.25", "--layers", "1-2", "-o", out, "--seed", "3")
    assert result.exit_code == 0, result.output
    for needle in ("width before", "width after", "parameters before", "parameters after", "MLP FLOPs ratio", "time"):
        assert needle in result.output
    assert "64 (kept)" in result.output  # layer 0 untouched
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "modeling_mlpfusion.py"} <= files
    assert not list(tmp_path.glob(".*partial*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_sizes"] == [64, 16, 16] and cfg["mlpfusion"]["seed"] == 3
    info = run("info", out)
    assert info.exit_code == 0 and "mlpfusion_bert" in info.output and "64 16 16" in info.output


def test_same_input_and_seed_give_the_same_bytes(bert_dir, tmp_path):
    for name in ("a", "b"):
        assert run("compress", bert_dir, "--ratio", "0.5", "-o", tmp_path / name).exit_code == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert run("compress", bert_dir, "--ratio", "0.5", "--seed", "1", "-o", tmp_path / "c").exit_code == 0
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()


def test_fold_scale_with_one_width_writes_a_stock_checkpoint(bert_dir, tmp_path):
    result = run("compress", bert_dir, "--ratio", "0.5", "--fold-scale", "-o", tmp_path / "stock")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertForMaskedLM"] and "auto_map" not in cfg


def test_default_output_name_and_output_in_the_way(bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("compress", bert_dir, "--ratio", "0.5").exit_code == 0
    out = tmp_path / "tiny-bert-mlpfusion-0.5"
    assert (out / "model.safetensors").is_file()
    marker = out / "mine.txt"
    marker.write_text("keep me")
    before = (out / "model.safetensors").read_bytes()
    assert_one_line_error(run("compress", bert_dir, "--ratio", "0.5", "--seed", "2"), "already exists", "--overwrite")
    assert marker.read_text() == "keep me" and (out / "model.safetensors").read_bytes() == before
    result = run("compress", bert_dir, "--ratio", "0.25", "--overwrite", "-o", out)
    assert result.exit_code == 0, result.output
    assert not marker.exists() and json.loads((out / "config.json").read_text())["intermediate_sizes"] == [16] * 3
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run("compress", bert_dir, "-o", tmp_path / "afile"), "already exists")


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--ratio", "0"], ["outside (0, 1]"]),
        (["--ratio", "1.5"], ["outside (0, 1]"]),
        (["--ratio", "-0.2"], ["outside (0, 1]"]),
        (["--ratio", "0.001"], ["leaves no neuron"]),
        (["--intermediate-size", "0"], ["leaves no neuron"]),
        (["--intermediate-size", "65"], ["larger than"]),
        (["--ratio", "0.5", "--intermediate-size", "8"], ["not both"]),
        (["--layers", "1-x"], ["bad layer list"]),
        (["--layers", "2-1"], ["low-high"]),
        (["--layers", "0,7"], ["out of range", "3 layers"]),
        (["--layers", "1,4-90,99"], ["layer(s) 4-90, 99 out of range", "3 layers (0-2)"]),  # short, not 88 indices
        (["--layers", "0-99999999"], ["beyond any model's depth"]),  # refused before 10^8 indices are made
        (["--width-multiple", "32"], ["width multiple 32 is larger than the fused width 16", "at most 16"]),
        (["--allocate", "--calibration", "builtin", "--width-multiple", "32"], ["fused width 16"]),
        (["--calibration-column", "body"], ["names the text column", "add --calibration"]),  # not ignored
        (["--calibration-samples", "8"], ["--calibration-samples sizes the calibration text", "add --calibration"]),
        (["--private"], ["--private is for the upload", "add --push-to-hub"]),
        (["--create-pr", "--commit-message", "m"], ["--create-pr and --commit-message are for the upload"]),
        (["--revision", "v1"], ["--revision picks a version of a Hub model", "is a local folder"]),  # not ignored
        (["--endpoint", "http://127.0.0.1:9"], ["--endpoint is for the Hub", "is a local folder", "add --push-to-hub"]),
        (["--token", "hf_x", "--endpoint", "http://127.0.0.1:9"], ["--endpoint and --token are for the Hub"]),
        (["--method", "magic"], ["unknown method"]),
        (["--method", "prune", "--fold-scale"], ["'prune' has none (only fusion does)", "drop --fold-scale"]),
        (["--method", "cluster", "--fold-scale"], ["'cluster' has none"]),  # not recorded as folded on the card
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], ["device"]),
    ],
)
def test_bad_settings_are_one_line_errors(bert_dir, tmp_path, args, needles):
    out = tmp_path / "never"
    assert_one_line_error(run("compress", bert_dir, *args, "-o", out), *needles)
    assert not out.exists()


def test_missing_model_and_unsupported_architecture(tmp_path):
    assert_one_line_error(run("compress", tmp_path / "nope", "-o", tmp_path / "o"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("compress", tmp_path / "empty", "-o", tmp_path / "o"), "no config.json")
    tiny.model("bert", "BertModel").save_pretrained(tmp_path / "st" / "0_Transformer")  # an old sentence-transformers layout
    assert_one_line_error(run("compress", tmp_path / "st", "-o", tmp_path / "o"), "no config.json",
                          f"the model inside is {tmp_path / 'st' / '0_Transformer'}: compress that folder")
    import transformers

    cfg = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50)
    transformers.T5EncoderModel(cfg).save_pretrained(tmp_path / "t5")
    assert_one_line_error(run("compress", tmp_path / "t5", "-o", tmp_path / "o"), "unsupported architecture", "bert", "llama", "gpt2")
    assert not (tmp_path / "o").exists()


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert_one_line_error(run("compress", "some-org/some-model", "-o", tmp_path / "o"), "could not download", "network",
                          code=4)  # the network exit code, as for uploads


def test_corrupt_truncated_and_pickled_weights(bert_dir, tmp_path):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(bert_dir, bad)
    weights = bad / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 64)
    assert_one_line_error(run("compress", bad, "-o", tmp_path / "o"), "corrupt or truncated", "download it again", code=5)
    (bad / "model.safetensors").write_bytes(b"\x00" * 4)
    assert_one_line_error(run("compress", bad, "-o", tmp_path / "o"), "corrupt or truncated", code=5)
    pickled = tmp_path / "pickled"
    shutil.copytree(bert_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert_one_line_error(run("compress", pickled, "-o", tmp_path / "o"), "pickled", "--allow-pickle")
    assert not (tmp_path / "o").exists()
    result = run("compress", pickled, "--allow-pickle", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.safetensors").is_file() and not list((tmp_path / "o").glob("*.bin"))


def test_interrupted_run_leaves_nothing_behind(bert_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        (a[1] / "config.json").write_text("{}")  # half-written...
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_mod, "save_fused", boom)
    result = run("compress", bert_dir, "-o", tmp_path / "o")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert list(tmp_path.iterdir()) == []


def test_info_on_a_folder_that_is_not_fused(bert_dir, tmp_path):
    assert_one_line_error(run("info", bert_dir), "not an MLP-fused checkpoint", f"`mlpfusion compress {bert_dir}` makes one")
    assert_one_line_error(run("info", tmp_path), "no config.json")
    # a folder that is not there at all says so, as compress and evaluate do
    assert_one_line_error(run("info", tmp_path / "typo"), "no such folder")
    assert_one_line_error(run("info", bert_dir, "--revision", "v1"), "--revision is for a model on the Hub")
    assert_one_line_error(run("info", bert_dir, "--endpoint", "http://127.0.0.1:9"), "--endpoint is for a model on the Hub")
    assert_one_line_error(run("info", bert_dir, "--token", "hf_x"), "drop --token")


def test_real_entry_point_prints_one_line_on_stderr(tmp_path):
    exe = Path(sys.executable).parent / "mlpfusion"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hf_mlpfusion.cli.main"]
    proc = subprocess.run([*cmd, "compress", str(tmp_path / "missing"), "--ratio", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_builtin_default_minilm_with_tokenizer_copied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("compress", "--layers", "5", "--ratio", "0.25")
    assert result.exit_code == 0, result.output
    out = tmp_path / "all-MiniLM-L6-v2-mlpfusion-0.25"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_sizes"] == [1536] * 5 + [384]
    assert cfg["mlpfusion"]["source_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    import transformers

    import hf_mlpfusion  # noqa: F401

    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModel.from_pretrained(out)
    assert model(**tok(["a small test"], return_tensors="pt")).last_hidden_state.shape[-1] == 384


def test_the_default_output_of_a_relative_dot_source_is_named_after_its_folder(tmp_path, monkeypatch):
    from hf_mlpfusion import FusionConfig
    from hf_mlpfusion.compress import default_output

    (tmp_path / "my-bert" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "my-bert")
    config = FusionConfig(ratio=0.5)
    beside = tmp_path.resolve() / "my-bert-mlpfusion-0.5"  # run from inside the model: beside it, not in it
    assert default_output(".", config) == default_output("./", config) == beside
    monkeypatch.chdir(tmp_path / "my-bert" / "sub")
    assert default_output("..", config) == beside  # not "..-mlpfusion-0.5"
    assert default_output("org/name", config) == Path("name-mlpfusion-0.5")
    monkeypatch.chdir(tmp_path)
    assert default_output("my-bert", config) == Path("my-bert-mlpfusion-0.5")  # from outside: the current folder


def test_compress_dot_from_inside_the_model_writes_beside_it(bert_dir, tmp_path, monkeypatch):
    source = tmp_path / "my-bert"
    shutil.copytree(bert_dir, source)
    before = sorted(p.name for p in source.iterdir())
    monkeypatch.chdir(source)
    result = run("compress", ".", "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-bert-mlpfusion-0.5" / "model.safetensors").is_file()
    assert sorted(p.name for p in source.iterdir()) == before  # nothing written into the source
