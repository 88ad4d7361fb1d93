"""Calibrated compress a block at a time (`hf_mlpfusion.io.layerwise`): the in-memory path's bytes, for
every family and option, one block of the source in memory at a time, and the in-memory path with a
note where it cannot apply."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from hf_mlpfusion import FusionConfig
from hf_mlpfusion.compress import compress
from hf_mlpfusion.errors import CorruptCheckpointError, InvalidConfigError
from hf_mlpfusion.io import LazyModel
from test_evaluate import tiny_tokenizer
from test_streaming import assert_same_files, streamed, track_loaded

pytestmark = pytest.mark.usefixtures("one_thread")
TYPE_HEADS = tiny.one_head_per_type()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def source(tmp_path, tok, model_type="bert", head="BertModel", layers=3, **save):
    src = tmp_path / "src"
    tiny.model(model_type, head, layers=layers).save_pretrained(src, **save)
    tok.save_pretrained(src)
    return src


def both_ways(src, config, tmp_path, **kw):
    kw = {"calibration": "builtin", "calibration_samples": 48, **kw}
    a = compress(str(src), config, tmp_path / "layerwise", streaming=True, **kw)
    b = compress(str(src), config, tmp_path / "memory", streaming=False, **kw)
    assert streamed(a) and not streamed(b)
    assert_same_files(a.output, b.output)
    return a, b


@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_calibrated_layerwise_writes_the_in_memory_bytes(tmp_path, tok, model_type, head):
    src = source(tmp_path, tok, model_type, head, max_shard_size="40KB")  # a sharded source
    a, _ = both_ways(src, FusionConfig(ratio=0.5, layers=[0, 2], seed=1), tmp_path)
    meta = json.loads((a.output / "config.json").read_text())["mlpfusion"]
    assert meta["clustering"] == "data-aware" and meta["calibration"]["refit"]
    assert [e["layer"] for e in meta["calibration"]["layers"]] == [0, 2]
    assert all(e["error_after"] <= e["error_before"] for e in meta["calibration"]["layers"])


@pytest.mark.parametrize("model_type,head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel"),
                                             ("llama", "LlamaForCausalLM")])
def test_allocation_layerwise_writes_the_in_memory_bytes(tmp_path, tok, model_type, head):
    src = source(tmp_path, tok, model_type, head, layers=4)
    a, _ = both_ways(src, FusionConfig(ratio=0.25, layers="0-2", width_multiple=8), tmp_path, allocate=True)
    meta = json.loads((a.output / "config.json").read_text())["mlpfusion"]
    assert meta["allocation"]["budget"] == 48 and sum(meta["widths_after"][:3]) <= 48


@pytest.mark.parametrize("config,kw", [
    (FusionConfig(ratio=0.25, layers=[1, 2]), dict(distill_steps=3)),  # refit, distill, refit
    (FusionConfig(ratio=0.25), dict(distill_steps=2, calibration=None)),  # distillation alone, no refit
    (FusionConfig(ratio=0.25), dict(data_aware=False)),
    (FusionConfig(ratio=0.5, method="prune", layers=[2]), {}),
    (FusionConfig(ratio=0.5, method="cluster"), {}),
    (FusionConfig(ratio=0.25, fold_scale=True), {}),  # a stock model
], ids=["distill", "distill-only", "data-free-clustering", "prune", "cluster", "fold"])
def test_every_calibration_option_gives_the_in_memory_bytes(tmp_path, tok, config, kw):
    src = source(tmp_path, tok, "gpt2", "GPT2LMHeadModel")
    both_ways(src, config, tmp_path, **kw)


def test_bf16_source_calibrates_in_float32_and_keeps_its_dtype(tmp_path, tok):
    src = tmp_path / "src"
    tiny.model("llama", "LlamaForCausalLM").to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    a, _ = both_ways(src, FusionConfig(ratio=0.5, layers=[1, 2]), tmp_path)
    assert {t.dtype for t in load_file(a.output / "model.safetensors").values()} == {torch.bfloat16}


def test_layerwise_holds_one_block_of_the_source_at_a_time(tmp_path, tok, monkeypatch):
    src = source(tmp_path, tok, "llama", "LlamaForCausalLM", layers=5)
    lazy = LazyModel(src)
    block_of = {n: i for i, b in enumerate(lazy.block_names) for n in lazy.names_under(b)}
    outside = set(lazy.outside_blocks())
    most_blocks, with_outside = [0], []

    def on_load(live):
        blocks = len({block_of[n] for n in live if n in block_of})
        most_blocks[0] = max(most_blocks[0], blocks)
        with_outside.append(bool(live & outside) and blocks > 1)

    live = track_loaded(monkeypatch, on_load)
    result = compress(str(src), FusionConfig(ratio=0.5, layers=[1, 3]), tmp_path / "out", calibration="builtin",
                      calibration_samples=32, allocate=True)
    assert streamed(result)
    assert most_blocks[0] == 1 and not any(with_outside) and not live


def test_a_method_that_batches_layers_calibrates_in_memory_with_a_note(tmp_path, tok, caplog):
    src = source(tmp_path, tok)
    with caplog.at_level(logging.WARNING, logger="hf_mlpfusion"):
        result = compress(str(src), FusionConfig(ratio=0.5, method="sketch"), tmp_path / "out",
                          calibration="builtin", calibration_samples=16)
    assert not streamed(result)
    assert any("in memory, not streaming" in r.getMessage() and "sketch" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidConfigError, match="cannot stream this compress"):
        compress(str(src), FusionConfig(ratio=0.5, method="sketch"), tmp_path / "out2", calibration="builtin",
                 calibration_samples=16, streaming=True)
    assert not (tmp_path / "out2").exists()


def test_a_nan_in_a_fused_layer_stops_it_and_writes_nothing(tmp_path, tok):
    src = source(tmp_path, tok)
    state = load_file(src / "model.safetensors")
    key = "encoder.layer.2.intermediate.dense.weight"
    state[key][0, 0] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=key.replace(".", r"\.")):
        compress(str(src), FusionConfig(ratio=0.5), tmp_path / "out", calibration="builtin", calibration_samples=16,
                 streaming=True)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
