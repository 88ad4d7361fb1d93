"""The math through the whole model: exactness at ratio 1, repeated neurons, folding, widths, metadata."""

import pytest
import torch

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.architectures import get_adapter
from hf_mlpfusion.fusion import cluster_sizes, split_vectors, sub_mlp_vectors

FAMILY_HEADS = [("bert", "BertForMaskedLM"), ("roberta", "RobertaForSequenceClassification"), ("gpt2", "GPT2LMHeadModel")]


@pytest.mark.parametrize("family,head", FAMILY_HEADS)
def test_ratio_one_reproduces_the_model(family, head):
    m = tiny.model(family, head)
    fused = fuse(m, FusionConfig(ratio=1.0, seed=3))
    assert fused.config.intermediate_sizes == [64, 64, 64]
    assert tiny.max_diff(tiny.outputs(m, head), tiny.outputs(fused, head)) < 1e-5


@pytest.mark.parametrize("family,head", FAMILY_HEADS)
def test_repeated_neurons_fuse_to_identical_outputs(family, head):
    """A model whose 64 neurons are 16 distinct ones, each repeated 4 times, fuses exactly at ratio 0.25."""
    m = tiny.model(family, head)
    adapter = get_adapter(m.config.model_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in adapter.blocks(m):
            fc1, fc2 = adapter.mlp_modules(block)
            w = adapter.read(block)
            base1, baseb, base2 = w.w1[:16].clone(), w.b1[:16].clone(), w.w2[:, :16].clone()
            perm = torch.randperm(64, generator=g)
            src = torch.arange(64) % 16
            new = type(w)(base1[src][perm], baseb[src][perm], base2[:, src][:, perm], w.b2)
            t1, tb1, t2, _ = adapter.tensors(new)
            fc1.weight.copy_(t1)
            fc1.bias.copy_(tb1)
            fc2.weight.copy_(t2)
    fused = fuse(m, FusionConfig(ratio=0.25))
    assert fused.config.intermediate_sizes == [16, 16, 16]
    for block in adapter.blocks(fused):
        assert torch.equal(adapter.mlp_modules(block)[1].counts, torch.full((16,), 4.0))
    assert tiny.max_diff(tiny.outputs(m, head), tiny.outputs(fused, head)) < 1e-5


@pytest.mark.parametrize("family,head", FAMILY_HEADS)
def test_fold_scale_matches_counts_and_gives_stock_class(family, head):
    m = tiny.model(family, head)
    kept = fuse(m, FusionConfig(ratio=0.5, seed=1))
    folded = fuse(m, FusionConfig(ratio=0.5, seed=1, fold_scale=True))
    assert type(folded) is type(m)  # one width everywhere, no count vector: stock transformers
    assert "mlpfusion" not in folded.config.model_type
    assert tiny.max_diff(tiny.outputs(kept, head), tiny.outputs(folded, head)) < 1e-5
    partial = fuse(m, FusionConfig(ratio=0.5, layers=[1], fold_scale=True))
    assert type(partial).__name__ == "MLPFusion" + head  # widths differ per layer: custom classes
    assert partial.config.count_layers == [] and partial.config.intermediate_sizes == [64, 32, 64]


def test_partial_layers_widths_counts_and_metadata():
    m = tiny.model("bert", "BertModel", layers=4)
    fused = fuse(m, FusionConfig(ratio=0.25, layers="1-2", seed=7), source="org/tiny")
    assert fused.config.intermediate_sizes == [64, 16, 16, 64]
    assert fused.config.count_layers == [1, 2]
    layer = fused.encoder.layer
    assert layer[0].intermediate.dense.weight.shape == (64, 32)
    assert layer[1].intermediate.dense.weight.shape == (16, 32)
    assert layer[1].output.dense.weight.shape == (32, 16)
    assert layer[1].output.dense.counts.sum().item() == 64
    assert not hasattr(layer[0].output.dense, "counts")
    # untouched parts are equal to, but not shared with, the input model
    assert torch.equal(layer[0].intermediate.dense.weight, m.encoder.layer[0].intermediate.dense.weight)
    assert layer[0].intermediate.dense.weight.data_ptr() != m.encoder.layer[0].intermediate.dense.weight.data_ptr()
    assert torch.equal(layer[1].output.dense.bias, m.encoder.layer[1].output.dense.bias)  # b2 unchanged
    meta = fused.config.mlpfusion
    assert meta["layers"] == [1, 2] and meta["seed"] == 7 and meta["source_model"] == "org/tiny"
    assert meta["widths_before"] == [64] * 4 and meta["widths_after"] == [64, 16, 16, 64]
    assert meta["num_parameters_after"] < meta["num_parameters_before"]
    assert len(meta["inertia"]) == 2 and all(v > 0 for v in meta["inertia"])


def test_input_model_is_left_untouched():
    m = tiny.model("gpt2", "GPT2LMHeadModel")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fused = fuse(m, FusionConfig(ratio=0.25))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert fused.lm_head.weight.data_ptr() == fused.transformer.wte.weight.data_ptr()  # still tied


def test_intermediate_size_and_determinism():
    m = tiny.model("roberta", "RobertaModel")
    a = fuse(m, FusionConfig(intermediate_size=10, seed=5))
    b = fuse(m, FusionConfig(intermediate_size=10, seed=5))
    assert a.config.intermediate_sizes == [10, 10, 10]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_sub_mlp_vectors_round_trip_and_counts():
    g = torch.Generator().manual_seed(0)
    w1, b1, w2 = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    z = sub_mlp_vectors(w1, b1, w2)
    assert z.shape == (2, 6, 9)
    assert torch.equal(z[0, 2], torch.cat([w1[0, 2], b1[0, 2:3], w2[0, :, 2]]))
    r1, rb1, r2 = split_vectors(z, 4)
    assert torch.equal(r1, w1) and torch.equal(rb1, b1) and torch.equal(r2, w2)
    counts = cluster_sizes(torch.tensor([[0, 0, 1, 2, 2, 2]]), 3)
    assert counts.tolist() == [[2.0, 1.0, 3.0]]


def test_fusing_a_fused_or_unsupported_model_is_a_clear_error():
    from hf_mlpfusion.errors import UnsupportedArchitectureError

    fused = fuse(tiny.model("bert", "BertModel"), FusionConfig(ratio=0.5))
    with pytest.raises(UnsupportedArchitectureError, match="already MLP-fused"):
        fuse(fused, FusionConfig(ratio=0.5))
    import transformers

    distil = transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: bert"):
        fuse(distil, FusionConfig(ratio=0.5))
