"""Streaming compress (hf_mlpfusion.io): the writer's bytes are save_file's / save_pretrained's, the
streaming path's bytes are the in-memory path's for every model type and method, it holds one layer
group at a time, it falls back (with a notice) exactly when the files are not what the model loads,
and LazyModel loads blocks on demand into what from_pretrained gives."""

from __future__ import annotations

import json
import shutil
import logging
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save, save_file

import tiny
from hf_mlpfusion import FusionConfig
from hf_mlpfusion.compress import compress
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.io import LazyModel, NotStreamable, ShardedWriter, parse_shard_size, write_pretrained
from hf_mlpfusion.io import stream
from hf_mlpfusion.io.safetensors_format import DTYPES, TensorSpec, header, tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
TYPE_HEADS = tiny.one_head_per_type()


def files(folder) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_files(a, b) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []


def streamed(result) -> bool:
    """Whether compress took the streaming path (its result's model never left the meta device)."""
    return next(result.model.parameters()).is_meta


# ----------------------------------------------------------------------------- the file format
def test_header_and_offsets_reproduce_save_file_for_every_dtype():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        tensors[f"w.{i}.{name}"] = torch.randn(3, 2 + i, generator=g).to(dtype)
    tensors.update({"zz.empty": torch.zeros(0, 4), "a.scalar": torch.tensor(3.0), "é.unicode": torch.ones(2),
                    "b": torch.arange(5)})
    layout = header({k: TensorSpec.of(v) for k, v in tensors.items()}, {"format": "pt"})
    buf = bytearray(layout.size)
    buf[: len(layout.header)] = layout.header
    for name in reversed(list(tensors)):  # any order
        start, end = layout.offsets[name]
        buf[len(layout.header) + start : len(layout.header) + end] = tensor_bytes(tensors[name])
    assert bytes(buf) == save(tensors, metadata={"format": "pt"})


def test_writer_checks_what_it_is_given(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (2, 3)), "b": TensorSpec(torch.int64, (4,))}
    w = ShardedWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="planned as"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(KeyError):
        w.write("c", torch.zeros(1))
    w.write("b", torch.arange(4))
    with pytest.raises(ValueError, match="twice"):
        w.write("b", torch.arange(4))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    w.write("a", torch.ones(2, 3))
    w.close()
    assert load_file(tmp_path / "model.safetensors")["a"].sum() == 6


def test_shard_sizes_parse_like_transformers():
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("500MB") == 5 * 10**8
    assert parse_shard_size(1234) == 1234 and parse_shard_size("1234") == 1234
    for bad in ("5 parsecs", "-1", 0, "GB", True):
        with pytest.raises(InvalidConfigError):
            parse_shard_size(bad)


@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_write_pretrained_is_save_pretrained_byte_for_byte(tmp_path, model_type, head):
    from hf_mlpfusion import fuse

    m = tiny.model(model_type, head)
    for n, model in enumerate((m, fuse(m, FusionConfig(ratio=0.5, layers=[1])))):
        for shard in ("50GB", "30KB"):
            a, b = tmp_path / f"a{n}{shard}", tmp_path / f"b{n}{shard}"
            model.save_pretrained(a, max_shard_size=shard)
            write_pretrained(model, b, max_shard_size=shard)
            assert_same_files(a, b)
    assert (tmp_path / "b130KB" / "model.safetensors.index.json").is_file()  # really sharded


# ----------------------------------------------------------------------------- streaming == in memory
def both_ways(src, config, tmp_path, tag="", **kw):
    a = compress(str(src), config, tmp_path / f"stream{tag}", streaming=True, **kw)
    b = compress(str(src), config, tmp_path / f"memory{tag}", streaming=False, **kw)
    assert streamed(a) and not streamed(b)
    assert_same_files(a.output, b.output)
    assert (a.inertia, a.widths_after, a.parameters_after) == (b.inertia, b.widths_after, b.parameters_after)
    return a, b


@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_streaming_writes_the_in_memory_bytes(tmp_path, model_type, head):
    src = tmp_path / "src"
    tiny.model(model_type, head).save_pretrained(src, max_shard_size="40KB")  # a sharded source
    a, _ = both_ways(src, FusionConfig(ratio=0.5, layers=[0, 2], seed=1), tmp_path, max_shard_size="30KB")
    assert len(list(a.output.glob("model-*-of-*.safetensors"))) > 1
    fused = transformers.AutoModel.from_pretrained(a.output)  # and it loads, with the fused widths
    assert tiny.family_for(model_type).intermediate_size(fused.config) == 64
    assert fused.config.intermediate_sizes == [32, 64, 32]


@pytest.mark.parametrize("config", [
    FusionConfig(ratio=0.25, fold_scale=True),  # one width, no counts: a stock model
    FusionConfig(ratio=0.5, layers=[1], fold_scale=True),
    FusionConfig(intermediate_size=10, method="cluster"),
    FusionConfig(ratio=0.25, method="prune", layers="0-1"),
    FusionConfig(ratio=0.25, method="sketch", seed=4),  # its random matrix depends on the batch: in-memory groups
    FusionConfig(ratio=0.5, widths={0: 8, 2: 40}),  # per-layer widths (what --allocate chooses)
], ids=["fold", "fold-partial", "cluster", "prune", "sketch", "widths"])
def test_streaming_equals_in_memory_for_every_method(tmp_path, config):
    src = tmp_path / "src"
    tiny.model("gpt2", "GPT2LMHeadModel").save_pretrained(src)
    both_ways(src, config, tmp_path)


def test_groups_of_any_size_give_the_same_bytes(tmp_path):
    src = tmp_path / "src"
    tiny.model("bert", "BertForMaskedLM", layers=5).save_pretrained(src)
    config = FusionConfig(ratio=0.25, layers="0-3", seed=5)
    outs = []
    for n in (1, 3, 8):
        p = stream.plan(src, config, layers_per_group=n)
        assert [len(g) for g in p.groups] == {1: [1, 1, 1, 1], 3: [3, 1], 8: [4]}[n]
        out = tmp_path / f"g{n}"
        stream.compress_streaming(p, src, out, source="src")
        outs.append(out)
    assert_same_files(outs[0], outs[1])
    assert_same_files(outs[0], outs[2])


@pytest.fixture
def two_threads():
    """One thread never splits a reduction, so it would hide batch-dependent rounding."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_kmeans_inertia_does_not_depend_on_the_batch_at_a_size_torch_splits_across_threads(two_threads):
    """The contract streaming's byte identity rests on. Labels and centres always held; the float64 inertia,
    summed over the whole batch at once, differed in its last bits once a layer had > 32k entries."""
    from hf_mlpfusion.core.kmeans import kmeans

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 300, 200, generator=g) * torch.rand(6, 1, 200, generator=g)
    batch = kmeans(z, 75, seed=1)
    for b in range(6):
        one = kmeans(z[b], 75, seed=1)
        assert torch.equal(one.labels, batch.labels[b]) and torch.equal(one.centers, batch.centers[b])
        assert torch.equal(one.inertia, batch.inertia[b])


@pytest.mark.parametrize("model_type,head", [("bert", "BertModel"), ("llama", "LlamaForCausalLM")])
def test_streaming_equals_in_memory_for_layers_too_big_for_one_thread(tmp_path, two_threads, model_type, head):
    """Sub-MLP vectors of 300 x 201 (linear) and 300 x 300 (gated) entries: large enough for torch to split
    reductions across threads, which is where batch-dependent rounding shows (the tiny models are not)."""
    src = tmp_path / "src"
    tiny.model(model_type, head, width=300, hidden=100).save_pretrained(src)
    both_ways(src, FusionConfig(ratio=0.25, seed=3), tmp_path)


def test_bf16_source_keeps_its_dtype(tmp_path):
    src = tmp_path / "src"
    tiny.model("llama", "LlamaForCausalLM").to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    a, _ = both_ways(src, FusionConfig(ratio=0.5, seed=0), tmp_path)
    out = {}
    for f in a.output.glob("*.safetensors"):
        out.update(load_file(f))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert json.loads((a.output / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_real_minilm_streams_with_its_extra_position_ids(tmp_path):
    """Its file also stores `embeddings.position_ids`, a buffer transformers no longer saves: ignored, as loading does."""
    from hf_mlpfusion.compress import default_model_path

    a, _ = both_ways(default_model_path(), FusionConfig(ratio=0.25, layers=[2]), tmp_path)
    assert (a.output / "1_Pooling" / "config.json").is_file() and (a.output / "README.md").is_file()


def track_loaded(monkeypatch, on_load) -> set:
    """The names LazyModel has loaded and not released, kept up to date (the set returned);
    `on_load(live)` runs after every load."""
    live: set = set()
    load, release = LazyModel.load, LazyModel.release

    def counting_load(self, names, device=None):
        live.update(names)
        on_load(live)
        return load(self, names, device)

    def counting_release(self, names):
        live.difference_update(names)
        return release(self, names)

    monkeypatch.setattr(LazyModel, "load", counting_load)
    monkeypatch.setattr(LazyModel, "release", counting_release)
    return live


def test_streaming_holds_one_layer_group_of_mlps_at_a_time(tmp_path, monkeypatch):
    src = tmp_path / "src"
    tiny.model("llama", "LlamaForCausalLM", layers=4).save_pretrained(src)
    peak = [0]
    live = track_loaded(monkeypatch, lambda live: peak.__setitem__(0, max(peak[0], len(live))))
    result = compress(str(src), FusionConfig(ratio=0.5), tmp_path / "out")
    assert streamed(result)
    assert peak[0] == 3 and not live  # gate, up and down of one layer; nothing left loaded


@pytest.mark.parametrize("method", ["fusion", "cluster"])
def test_streaming_frees_each_layer_before_its_clustering(tmp_path, monkeypatch, method):
    # data-free fusion reads a layer's weights only to build its vectors: the k-means runs without them
    # (nothing holds them: not the loader, not a view), so one layer's weights never add to its peak
    from hf_mlpfusion.methods import fusion

    src = tmp_path / "src"
    tiny.model("llama", "LlamaForCausalLM", layers=3).to(torch.bfloat16).save_pretrained(src)
    weights: list = []
    load = LazyModel.load

    def recording_load(self, names, device=None):
        load(self, names, device)
        params = dict(self.model.named_parameters())
        weights.extend(weakref.ref(params[n]) for n in names if ".mlp." in n and n in params)

    alive_at_kmeans = []
    kmeans = fusion.kmeans

    def checking_kmeans(x, k, **kw):
        alive_at_kmeans.append(sum(w() is not None for w in weights))
        return kmeans(x, k, **kw)

    monkeypatch.setattr(LazyModel, "load", recording_load)
    monkeypatch.setattr(fusion, "kmeans", checking_kmeans)
    result = compress(str(src), FusionConfig(ratio=0.5, method=method), tmp_path / "out")
    assert streamed(result)
    assert len(weights) == 9  # gate, up and down of 3 layers
    assert len(alive_at_kmeans) >= 3 and set(alive_at_kmeans) == {0}  # a k-means per layer (and the plan's probe)


# ----------------------------------------------------------------------------- when it does not stream
def _legacy_names(src):
    sd = load_file(src / "model.safetensors")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in sd.items()}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})


def _tied_stored(src):
    sd = load_file(src / "model.safetensors")
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})


def _cast_on_load(src):
    sd = {k: v.half() for k, v in load_file(src / "model.safetensors").items()}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})  # config.json still says float32


@pytest.mark.parametrize("model_type,head,change,why", [
    ("bert", "BertModel", _legacy_names, "has no tensor embeddings.LayerNorm.weight"),
    ("gpt2", "GPT2LMHeadModel", _tied_stored, "stores the tied weights"),
    ("gpt2", "GPT2LMHeadModel", _cast_on_load, "loading casts them"),
], ids=["legacy-names", "tied-stored", "cast-on-load"])
def test_files_that_load_differently_fall_back_to_memory_with_a_notice(tmp_path, caplog, model_type, head, change,
                                                                       why):
    src = tmp_path / "src"
    tiny.model(model_type, head).save_pretrained(src)
    change(src)
    with pytest.raises(NotStreamable, match=why):
        LazyModel(src)
    with caplog.at_level(logging.WARNING, logger="hf_mlpfusion"):
        result = compress(str(src), FusionConfig(ratio=0.5), tmp_path / "out")
    assert not streamed(result)
    notes = [r.getMessage() for r in caplog.records if r.name == "hf_mlpfusion"]
    assert len(notes) == 1 and "compressing in memory" in notes[0] and why in notes[0]
    with pytest.raises(InvalidConfigError, match=why):
        compress(str(src), FusionConfig(ratio=0.5), tmp_path / "insist", streaming=True)
    assert not (tmp_path / "insist").exists()


def test_a_truncated_source_is_left_to_the_loader_which_says_so(tmp_path, caplog):
    from hf_mlpfusion.errors import CorruptCheckpointError

    src = tmp_path / "src"
    tiny.model("bert", "BertModel").save_pretrained(src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(NotStreamable, match="truncated"):
        LazyModel(src)
    for streaming in (None, True):  # even when streaming is asked for, the loader's message is the useful one
        with caplog.at_level(logging.WARNING, logger="hf_mlpfusion"):
            with pytest.raises(CorruptCheckpointError):
                compress(str(src), FusionConfig(ratio=0.5), tmp_path / "out", streaming=streaming)
    assert not (tmp_path / "out").exists()
    assert not [r for r in caplog.records if r.name == "hf_mlpfusion"]  # no "compressing in memory" note first


def test_calibration_without_its_text_does_not_stream(tmp_path, caplog):
    """(compress always gives the text; `tests/test_layerwise.py` streams calibration block by block)."""
    src = tmp_path / "src"
    tiny.model("bert", "BertModel").save_pretrained(src)
    with pytest.raises(InvalidConfigError, match="need the calibration text"):
        stream.try_streaming(src, FusionConfig(), tmp_path / "x", streaming=True, data_free=False, source="s")
    with caplog.at_level(logging.WARNING, logger="hf_mlpfusion"):
        assert stream.try_streaming(src, FusionConfig(), tmp_path / "x", data_free=False, source="s") is None
    assert any("not streaming" in r.getMessage() for r in caplog.records) and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- LazyModel: blocks on demand
@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_lazy_model_loads_what_from_pretrained_gives_one_block_at_a_time(tmp_path, model_type, head):
    src = tmp_path / "src"
    tiny.model(model_type, head).save_pretrained(src, max_shard_size="40KB")
    ref = getattr(transformers, head).from_pretrained(src).eval()
    lazy = LazyModel(src)
    assert all(p.is_meta for p in lazy.model.parameters())
    lazy.load_outside_blocks()
    held = []
    for i in range(lazy.num_blocks):  # runs before blocks_on_demand's release hook: the block is still loaded
        lazy.block(i).register_forward_hook(lambda *a: held.append(len(lazy.loaded())))
    with lazy.blocks_on_demand():
        got = tiny.outputs(lazy.model, head)
    assert tiny.max_diff(tiny.outputs(ref, head), got) == 0.0
    per_block = len(lazy.names_under(lazy.block_names[0]))
    assert max(held) == len(lazy.outside_blocks()) + per_block  # one block at a time
    assert all(lazy.block(i).parameters().__next__().is_meta for i in range(lazy.num_blocks))
    lazy.release_all()
    assert lazy.loaded() == [] and all(p.is_meta for p in lazy.model.parameters())
    whole = lazy.load_all()
    assert tiny.max_diff(tiny.outputs(ref, head), tiny.outputs(whole, head)) == 0.0
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ref.named_buffers(), whole.named_buffers()))


def test_tied_weights_load_once_and_stay_tied(tmp_path):
    src = tmp_path / "src"
    tiny.model("gpt2", "GPT2LMHeadModel").save_pretrained(src)
    lazy = LazyModel(src)
    lazy.load(["lm_head.weight"])
    m = lazy.model
    assert m.lm_head.weight is m.transformer.wte.weight and not m.lm_head.weight.is_meta
    lazy.release(["transformer.wte.weight"])
    assert m.lm_head.weight is m.transformer.wte.weight and m.lm_head.weight.is_meta


# ----------------------------------------------------------------------------- the CLI
def test_cli_max_shard_size_and_in_memory_give_the_same_folder(tmp_path):
    from typer.testing import CliRunner

    from hf_mlpfusion.cli.main import app

    src = tmp_path / "src"
    tiny.model("roberta", "RobertaForMaskedLM").save_pretrained(src)
    runner = CliRunner()
    for flag in ("--streaming", "--in-memory"):
        res = runner.invoke(app, ["compress", str(src), "-o", str(tmp_path / flag), "--ratio", "0.5",
                                  "--max-shard-size", "30KB", flag, "--device", "cpu"])
        assert res.exit_code == 0, res.output
    assert_same_files(tmp_path / "--streaming", tmp_path / "--in-memory")
    index = json.loads((tmp_path / "--streaming" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    bad = runner.invoke(app, ["compress", str(src), "-o", str(tmp_path / "bad"), "--max-shard-size", "5 parsecs"])
    assert bad.exit_code != 0 and "shard size" in bad.output and not (tmp_path / "bad").exists()


def test_lazy_model_opens_a_fused_checkpoint_block_by_block(tmp_path):
    """What calibration needs for the fused side: its blocks (narrow MLPs, count vectors) on demand too."""
    src = tmp_path / "src"
    tiny.model("gpt2", "GPT2LMHeadModel").save_pretrained(src)
    out = compress(str(src), FusionConfig(ratio=0.5, layers=[1]), tmp_path / "out").output
    with pytest.raises(Exception, match="already MLP-fused"):
        LazyModel(out)
    lazy = LazyModel(out, fused_ok=True)
    assert type(lazy.model).__name__ == "MLPFusionGPT2LMHeadModel"
    block = lazy.load_block(1)
    assert block.mlp.c_fc.weight.shape == (32, 32) and block.mlp.act.counts.sum() == 64
    lazy.release_block(1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    lazy.load_outside_blocks()
    with lazy.blocks_on_demand():
        assert tiny.max_diff(tiny.outputs(ref, "GPT2LMHeadModel"), tiny.outputs(lazy.model, "GPT2LMHeadModel")) == 0.0


def test_release_freed_memory_early_sets_the_mmap_threshold_only_on_glibc():
    import platform

    from hf_mlpfusion.io.stream import release_freed_memory_early

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_freed_memory_early() is glibc


def test_a_calibrated_compress_fixes_the_mmap_threshold_only_for_a_large_checkpoint(tmp_path, monkeypatch):
    import platform

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    src = tmp_path / "src"
    tiny.model("llama", "LlamaForCausalLM", layers=2).save_pretrained(src)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert stream.fix_mmap_threshold_for(src, calibrated=False) is glibc  # data-free: always
    monkeypatch.setattr(stream, "LARGE_CHECKPOINT_BYTES", size + 1)
    assert stream.fix_mmap_threshold_for(src, calibrated=True) is False
    assert stream.fix_mmap_threshold_for(None, calibrated=True) is False  # (a Hub id, not downloaded yet)
    monkeypatch.setattr(stream, "LARGE_CHECKPOINT_BYTES", size)
    assert stream.fix_mmap_threshold_for(src, calibrated=True) is glibc
    # a stray .safetensors file beside a sharded checkpoint is not its weights: only the index's shards count
    shutil.copy(next(src.glob("*.safetensors")), src / "consolidated.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    monkeypatch.setattr(stream, "LARGE_CHECKPOINT_BYTES", size + 1)
    assert stream.fix_mmap_threshold_for(src, calibrated=True) is False
