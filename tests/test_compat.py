"""Checkpoints written by release 0.1.0 keep loading, on both routes, with the same outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from blocked import blocked

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_1_0"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
AUTO = {"BertForSequenceClassification": "AutoModelForSequenceClassification",
        "RobertaForMaskedLM": "AutoModelForMaskedLM", "GPT2LMHeadModel": "AutoModelForCausalLM"}


def _auto_for(folder: Path) -> str:
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return AUTO[arch.removeprefix("MLPFusion")]


def test_every_family_has_a_fixture():
    assert FAMILIES == ["bert", "gpt2", "roberta"]


@pytest.mark.parametrize("family", FAMILIES)
def test_v0_1_0_loads_with_the_package(family):
    import hf_mlpfusion  # noqa: F401

    folder = FIXTURES / family
    expected = load_file(str(folder / "expected.safetensors"))
    model = getattr(transformers, _auto_for(folder)).from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    assert torch.allclose(logits, expected["logits"], atol=1e-5), (logits - expected["logits"]).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_v0_1_0_loads_with_remote_code_without_the_package(family, tmp_path):
    folder = FIXTURES / family
    script = blocked() + f"""
import torch, transformers
from safetensors.torch import load_file
expected = load_file({str(folder / 'expected.safetensors')!r})
model = transformers.{_auto_for(folder)}.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=expected["input_ids"]).logits
print(float((logits - expected["logits"]).abs().max()))
"""
    env_home = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HOME": str(env_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5
