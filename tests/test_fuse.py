"""The math through the whole model, for every model type of the registry: exactness at ratio 1,
repeated neurons, folding, widths, metadata."""

import pytest
import torch

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.core.mlp import GATED, MLPTensors, cluster_sizes, split_vectors, sub_mlp_vectors
from hf_mlpfusion.families import family_for

TYPE_HEADS = tiny.one_head_per_type()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_ratio_one_reproduces_the_model(model_type, head):
    m = tiny.model(model_type, head)
    fused = fuse(m, FusionConfig(ratio=1.0, seed=3))
    assert fused.config.intermediate_sizes == [64, 64, 64]
    assert tiny.max_diff(tiny.outputs(m, head), tiny.outputs(fused, head)) < 1e-5


def repeat_neurons(m, family, groups: int = 16, seed: int = 0) -> None:
    """Make every MLP's neurons `groups` distinct ones, each repeated width/groups times, shuffled."""
    g = torch.Generator().manual_seed(seed)
    for block in family.block_list(m):
        w = family.read(block)
        p = w.width
        src = (torch.arange(p) % groups)[torch.randperm(p, generator=g)]
        family.write(block, w.select(src[None]).map(lambda t: t.detach().clone()))


@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_repeated_neurons_fuse_to_identical_outputs(model_type, head):
    """A model whose 64 neurons are 16 distinct ones, each repeated 4 times, fuses exactly at ratio 0.25."""
    m = tiny.model(model_type, head)
    family = family_for(model_type)
    repeat_neurons(m, family)
    fused = fuse(m, FusionConfig(ratio=0.25))
    assert fused.config.intermediate_sizes == [16, 16, 16]
    for block in family.block_list(fused):
        assert torch.equal(family.act(block).counts, torch.full((16,), 4.0))
    assert tiny.max_diff(tiny.outputs(m, head), tiny.outputs(fused, head)) < 1e-5


@pytest.mark.parametrize("model_type,head", TYPE_HEADS)
def test_fold_scale_matches_counts_and_gives_stock_class(model_type, head):
    m = tiny.model(model_type, head)
    kept = fuse(m, FusionConfig(ratio=0.5, seed=1))
    folded = fuse(m, FusionConfig(ratio=0.5, seed=1, fold_scale=True))
    assert type(folded) is type(m)  # one width everywhere, no count vector: stock transformers
    assert type(folded.config) is type(m.config) and "mlpfusion" not in folded.config.model_type
    family = family_for(model_type)
    assert family.intermediate_size(folded.config) == 32
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
    assert type(layer[1].output.dense) is torch.nn.Linear  # projections stay stock
    assert layer[1].intermediate.intermediate_act_fn.counts.sum().item() == 64
    assert not hasattr(layer[0].intermediate.intermediate_act_fn, "counts")
    # untouched parts are equal to, but not shared with, the input model
    assert torch.equal(layer[0].intermediate.dense.weight, m.encoder.layer[0].intermediate.dense.weight)
    assert layer[0].intermediate.dense.weight.data_ptr() != m.encoder.layer[0].intermediate.dense.weight.data_ptr()
    assert torch.equal(layer[1].output.dense.bias, m.encoder.layer[1].output.dense.bias)  # b2 unchanged
    meta = fused.config.mlpfusion
    assert meta["layers"] == [1, 2] and meta["seed"] == 7 and meta["source_model"] == "org/tiny"
    assert meta["widths_before"] == [64] * 4 and meta["widths_after"] == [64, 16, 16, 64]
    assert meta["num_parameters_after"] < meta["num_parameters_before"]
    assert len(meta["inertia"]) == 2 and all(v > 0 for v in meta["inertia"])


def test_gated_counts_scale_the_gated_product():
    """down(n * act(gate x) * up x): the count module sits between the activation and down_proj."""
    m = tiny.model("llama", "LlamaModel", layers=2)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[1], seed=0))
    mlp = fused.layers[1].mlp
    assert type(mlp.down_proj) is torch.nn.Linear and mlp.gate_proj.weight.shape == (16, 32)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    n = mlp.act_fn.counts
    want = mlp.down_proj(n * torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    with torch.no_grad():
        assert torch.allclose(mlp(x), want, atol=1e-6)
    assert n.sum().item() == 64 and n.min().item() >= 1


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
    lin = MLPTensors((w1,), (b1,), w2)
    z = sub_mlp_vectors(lin)
    assert z.shape == (2, 6, 9)
    assert torch.equal(z[0, 2], torch.cat([w1[0, 2], b1[0, 2:3], w2[0, :, 2]]))
    r = split_vectors(z, lin)
    assert torch.equal(r.ins[0], w1) and torch.equal(r.in_biases[0], b1) and torch.equal(r.out, w2)
    counts = cluster_sizes(torch.tensor([[0, 0, 1, 2, 2, 2]]), 3)
    assert counts.tolist() == [[2.0, 1.0, 3.0]]


def test_gated_sub_mlp_vector_is_gate_row_up_row_down_column():
    g = torch.Generator().manual_seed(1)
    wg, wu, wd = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g), torch.randn(1, 4, 6, generator=g)
    gated = MLPTensors((wg, wu), (None, None), wd, GATED)
    z = sub_mlp_vectors(gated)
    assert z.shape == (1, 6, 12)
    assert torch.equal(z[0, 3], torch.cat([wg[0, 3], wu[0, 3], wd[0, :, 3]]))
    r = split_vectors(z, gated)
    assert torch.equal(r.ins[0], wg) and torch.equal(r.ins[1], wu) and torch.equal(r.out, wd)
    assert r.in_biases == (None, None) and r.kind == GATED


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fusion_on_the_weights_dtype_equals_fusion_on_float32_copies(dtype):
    """fusion takes the layers in their own dtype (no float32 copy of the layers in reduce_layers):
    the same float32 sub-MLP vectors, so the same clustering and centres, bit for bit."""
    from hf_mlpfusion.methods import METHODS

    g = torch.Generator().manual_seed(2)
    for biased in (True, False):
        ins = (torch.randn(2, 40, 8, generator=g).to(dtype), torch.randn(2, 40, 8, generator=g).to(dtype))
        mlp = MLPTensors(ins[:1] if biased else ins, (torch.randn(2, 40, generator=g).to(dtype),) if biased else
                         (None, None), torch.randn(2, 8, 40, generator=g).to(dtype), "linear" if biased else GATED)
        as_f32 = mlp.map(lambda t: t.float())
        z = sub_mlp_vectors(mlp, torch.float32)
        assert z.dtype == torch.float32 and torch.equal(z, sub_mlp_vectors(as_f32))
        for name in ("fusion", "cluster"):
            assert METHODS[name].any_dtype
            a = METHODS[name].reduce(mlp, 10, seed=3, device="cpu")
            b = METHODS[name].reduce(as_f32, 10, seed=3, device="cpu")
            assert torch.equal(a.labels, b.labels) and torch.equal(a.inertia, b.inertia)
            for ta, tb in zip(a.mlps.parts(), b.mlps.parts()):
                assert ta.dtype == torch.float32 and torch.equal(ta, tb)


def test_fusing_a_fused_or_unsupported_model_is_a_clear_error():
    from hf_mlpfusion.errors import UnsupportedArchitectureError

    fused = fuse(tiny.model("bert", "BertModel"), FusionConfig(ratio=0.5))
    with pytest.raises(UnsupportedArchitectureError, match="already MLP-fused"):
        fuse(fused, FusionConfig(ratio=0.5))
    import transformers

    t5 = transformers.T5EncoderModel(transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="supports the model types bert, camembert"):
        fuse(t5, FusionConfig(ratio=0.5))
