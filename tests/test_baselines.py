"""The paper's baselines (cluster, prune, sketch): their math, and loadable checkpoints of the right width."""

import json

import pytest
import torch
import transformers

import hf_mlpfusion  # noqa: F401
import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import save_fused
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.core.mlp import MLPTensors
from hf_mlpfusion.methods import METHODS


def _linear(w1, b1, w2):
    return MLPTensors((w1,), (b1,), w2)


def _run(method, w1, b1, w2, k, **kw):
    """(w1, b1, w2, counts) of a method's result on a linear-pair batch."""
    red = METHODS[method].reduce(_linear(w1, b1, w2), k, **kw)
    return red.mlps.ins[0], red.mlps.in_biases[0], red.mlps.out, red.counts

BASELINES = ["cluster", "prune", "sketch"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(w1, b1, w2, x, act=torch.relu, counts=None):
    h = act(x @ w1.T + b1)
    return (h * counts if counts is not None else h) @ w2.T


def test_methods_are_registered_and_validated():
    assert set(METHODS) == {"fusion", "cluster", "prune", "sketch"}
    for m in METHODS:
        assert FusionConfig(method=m).method == m
    with pytest.raises(InvalidConfigError, match="unknown method"):
        FusionConfig(method="svd2")


def test_prune_keeps_the_largest_neurons_in_order():
    g = torch.Generator().manual_seed(0)
    w1, b1, w2 = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    w1[0, 4] *= 10
    w1[0, 1] *= 5
    w2[1, :, 0] *= 20
    rw1, rb1, rw2, counts = _run("prune", w1, b1, w2, 2)
    scores = w1.norm(dim=-1) * w2.norm(dim=-2)
    for b in range(2):
        keep = sorted(scores[b].topk(2).indices.tolist())
        assert torch.equal(rw1[b], w1[b, keep]) and torch.equal(rb1[b], b1[b, keep])
        assert torch.equal(rw2[b], w2[b][:, keep])
    assert counts is None and sorted(scores[0].topk(2).indices.tolist()) == [1, 4]


def test_cluster_is_exact_for_relu_on_duplicated_neurons():
    g = torch.Generator().manual_seed(1)
    w1, b1, w2 = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    idx = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 3])  # cluster sizes 3, 2, 2, 2, 1
    W1, B1, W2 = w1[:, idx], b1[:, idx], w2[:, :, idx]
    cw1, cb1, cw2, counts = _run("cluster", W1, B1, W2, 5, seed=0, device="cpu")
    assert counts is None
    x = torch.randn(7, 4, generator=g)
    want = _mlp(W1[0], B1[0], W2[0], x)
    got = _mlp(cw1[0], cb1[0], cw2[0], x)
    assert torch.allclose(got, want, atol=1e-4)
    # fusion (counts kept separately) agrees with it for ReLU
    fw1, fb1, fw2, fcounts = _run("fusion", W1, B1, W2, 5, seed=0, device="cpu")
    assert torch.allclose(_mlp(fw1[0], fb1[0], fw2[0], x, counts=fcounts[0]), want, atol=1e-4)
    # ... but the cluster baseline is not exact for GELU (sqrt(n) inside the activation)
    gelu = torch.nn.functional.gelu
    assert not torch.allclose(_mlp(cw1[0], cb1[0], cw2[0], x, gelu), _mlp(W1[0], B1[0], W2[0], x, gelu), atol=1e-3)


def test_sketch_is_seeded_and_linear_in_expectation():
    g = torch.Generator().manual_seed(2)
    w1, b1, w2 = torch.randn(3, 40, 8, generator=g), torch.randn(3, 40, generator=g), torch.randn(3, 8, 40, generator=g)
    a, b, c = (_run("sketch", w1, b1, w2, 10, seed=0), _run("sketch", w1, b1, w2, 10, seed=0),
               _run("sketch", w1, b1, w2, 10, seed=1))
    assert a[0].shape == (3, 10, 8) and a[1].shape == (3, 10) and a[2].shape == (3, 8, 10) and a[3] is None
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # with the identity activation, W2 S S^T W1 approximates W2 W1 (E[S S^T] = I) at full width
    full = _run("sketch", w1, b1, w2, 4000, seed=3)
    approx, exact = full[2] @ full[0], w2 @ w1
    assert ((approx - exact).norm() / exact.norm()) < 0.2


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("family,head", [("bert", "BertForSequenceClassification"), ("gpt2", "GPT2LMHeadModel"),
                                         ("roberta", "RobertaForMaskedLM")])
def test_each_baseline_gives_a_loadable_checkpoint_of_the_right_width(tmp_path, method, family, head):
    m = tiny.model(family, head)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[0, 2], method=method, seed=0))
    assert fused.config.mlpfusion["method"] == method
    assert fused.config.intermediate_sizes == [16, 64, 16] and fused.config.count_layers == []
    save_fused(fused, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_sizes"] == [16, 64, 16] and cfg["mlpfusion"]["method"] == method
    auto = getattr(transformers, tiny.auto_class_name(family, head))
    loaded = auto.from_pretrained(tmp_path / "out").eval()
    assert tiny.max_diff(tiny.outputs(fused, head), tiny.outputs(loaded, head)) < 1e-6
    assert tiny.max_diff(tiny.outputs(m, head), tiny.outputs(loaded, head)) > 1e-6  # it did change the model


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_on_every_layer_is_a_stock_checkpoint(tmp_path, method):
    m = tiny.model("bert")
    fused = fuse(m, FusionConfig(ratio=0.5, method=method))
    assert type(fused) is transformers.BertModel and fused.config.intermediate_size == 32
    save_fused(fused, tmp_path / "out")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is transformers.BertModel
    assert tiny.max_diff(tiny.outputs(fused, "BertModel"), tiny.outputs(loaded, "BertModel")) < 1e-6


def test_prune_at_ratio_one_is_the_identity():
    m = tiny.model("gpt2")
    assert tiny.max_diff(tiny.outputs(m, "GPT2Model"), tiny.outputs(fuse(m, FusionConfig(ratio=1.0, method="prune")), "GPT2Model")) == 0.0
