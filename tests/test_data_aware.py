"""Data-aware clustering: the metric is what its docstring says, it reduces to the paper's clustering
with a neutral metric, it lowers the output error on the data it was measured on, and `compress`
turns it on with calibration text (and refuses it where it cannot apply)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.calibrate import batches, capture_mlp_inputs, data_metrics
from hf_mlpfusion.cli.main import app
from hf_mlpfusion.compress import compress
from hf_mlpfusion.data import load_texts
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.core.metric import DataMetric, metric_vectors
from hf_mlpfusion.core.mlp import MLPTensors, sub_mlp_vectors
from hf_mlpfusion.families import family_of
from hf_mlpfusion.methods import METHODS


def fuse_mlps(w1, b1, w2, k, **kw):
    """Fusion of a linear-pair batch: (w1, b1, w2, counts, labels)."""
    red = METHODS["fusion"].reduce(MLPTensors((w1,), (b1,), w2), k, **kw)
    return red.mlps.ins[0], red.mlps.in_biases[0], red.mlps.out, red.counts, red.labels
from test_evaluate import tiny_tokenizer

CAL = load_texts(None, split="calibration", limit=32)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _random_mlps(B=2, p=48, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, p, d, generator=g), torch.randn(B, p, generator=g) * 0.1,
            torch.randn(B, d, p, generator=g))


def test_neutral_metric_gives_the_papers_clustering():
    w1, b1, w2 = _random_mlps()
    d = w1.shape[-1]
    neutral = DataMetric(torch.eye(d + 1).expand(2, -1, -1).clone(), torch.ones(2, 1), torch.ones(2))
    lin = MLPTensors((w1,), (b1,), w2)
    assert torch.equal(metric_vectors(lin, neutral), sub_mlp_vectors(lin))
    plain = fuse_mlps(w1, b1, w2, 8, seed=3, device="cpu")
    aware = fuse_mlps(w1, b1, w2, 8, seed=3, device="cpu", metric=neutral)
    assert torch.equal(plain[4], aware[4]) and torch.equal(plain[3], aware[3])
    # centres: the members' plain means, whichever space the clustering ran in
    assert torch.allclose(plain[0], aware[0], atol=1e-5) and torch.allclose(plain[2], aware[2], atol=1e-5)


def _mlp(w1, b1, w2, counts, x):
    h = torch.nn.functional.gelu(x @ w1.T + b1)
    return (h * counts) @ w2.T


def test_data_aware_clustering_lowers_the_error_on_its_data():
    """Inputs live in 2 of 8 directions: the paper's clustering spends its effort on weight
    differences the data never sees, the data-aware one does not."""
    g = torch.Generator().manual_seed(1)
    d, p, k = 8, 96, 12
    w1 = torch.randn(1, p, d, generator=g)
    w1[..., :2] *= 0.3  # the directions the data uses carry little of the weights' spread
    b1 = torch.randn(1, p, generator=g) * 0.1
    w2 = torch.randn(1, d, p, generator=g) * 0.3
    x = torch.zeros(4000, d)
    x[:, :2] = torch.randn(4000, 2, generator=g) * 2.0
    xa = torch.cat([x.double(), torch.ones(4000, 1, dtype=torch.float64)], 1)
    S = xa.T @ xa / 4000
    L = torch.linalg.cholesky(S + 1e-6 * torch.eye(d + 1, dtype=torch.float64))
    metric = DataMetric(L[None], torch.tensor([[0.5]]), torch.tensor([0.5]))
    want = _mlp(w1[0], b1[0], w2[0], torch.ones(p), x)
    errors = {}
    for name, m in (("data-free", None), ("data-aware", metric)):
        rw1, rb1, rw2, counts, _ = fuse_mlps(w1, b1, w2, k, seed=0, device="cpu", metric=m)
        got = _mlp(rw1[0], rb1[0], rw2[0], counts[0], x)
        errors[name] = float((got - want).pow(2).sum() / want.pow(2).sum())
    assert errors["data-aware"] < 0.5 * errors["data-free"], errors


def test_data_metrics_match_a_direct_computation(tok):
    m = tiny.model("bert", "BertModel", layers=3)
    metrics = data_metrics(m, [0, 2], CAL, tok)
    assert sorted(metrics) == [0, 2]
    a = family_of(m)
    enc = list(batches(CAL, tok, max_length=128, batch_size=16, model=m))
    for i, met in metrics.items():
        x = capture_mlp_inputs(m, i, enc).double()
        assert met.tokens == x.shape[0]
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        S = xa.T @ xa / x.shape[0]
        assert torch.allclose(met.chol @ met.chol.T, S, rtol=1e-4, atol=1e-6 * float(S.diagonal().mean()))
        w = a.read(a.block_list(m)[i])
        w1, b1, w2 = w.ins[0][0], w.in_biases[0][0], w.out[0]
        pre = (xa @ torch.cat([w1.double(), b1.double()[:, None]], 1).T).detach().requires_grad_(True)
        act = torch.nn.functional.gelu(pre)
        (grad,) = torch.autograd.grad(act.sum(), pre)
        act = act.detach()
        s1 = (w2.detach().double().pow(2).sum(0) * grad.pow(2).mean(0)).mean().sqrt()
        s2 = act.detach().pow(2).mean(0).mean().sqrt()
        assert float(met.in_scales[0]) == pytest.approx(float(s1), rel=1e-6)
        assert float(met.out_scale) == pytest.approx(float(s2), rel=1e-6)


def test_a_singular_input_covariance_still_gives_a_metric():
    """Inputs in a subspace (fewer tokens than features, a norm that removes a direction) make E[x x^T]
    singular, and its rounding can leave an eigenvalue below the ridge (a tiny Qwen2 on 64 samples did:
    -2e-6 of the mean diagonal), where Cholesky failed with a bare LinAlgError. The metric adds more
    ridge until it factors, and clusters with it."""
    from hf_mlpfusion.core.metric import MetricStats

    w1, b1, w2 = _random_mlps(B=1, p=24, d=8)
    mlp = MLPTensors((w1,), (b1,), w2)
    stats = MetricStats(mlp, torch.nn.functional.gelu)
    stats.add(torch.randn(50, 8))
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    eig = torch.tensor([3.0, 2, 1, 1, 1, 0.5, 0.5, 0.2, -2e-5], dtype=torch.float64)  # as rounded
    stats.xx = (q * eig) @ q.T * stats.n
    with pytest.raises(torch.linalg.LinAlgError):  # the ridge alone is not enough
        torch.linalg.cholesky(stats.xx / stats.n + torch.eye(9, dtype=torch.float64) * 1e-6 * 1.02)
    met = stats.metric()
    assert torch.isfinite(met.chol).all() and (met.chol.diagonal() > 0).all()
    red = METHODS["fusion"].reduce(mlp, 6, metric=DataMetric(met.chol[None], met.in_scales[None],
                                                               met.out_scale[None], met.tokens))
    assert red.counts.sum() == 24


def test_fuse_with_metrics_records_it_and_refuses_baselines_without_clustering(tok):
    m = tiny.model("gpt2", "GPT2LMHeadModel", layers=2)
    metrics = data_metrics(m, [0, 1], CAL, tok)
    fused = fuse(m, FusionConfig(ratio=0.25, seed=0), metrics=metrics)
    assert fused.config.mlpfusion["clustering"] == "data-aware"
    assert fused.config.mlpfusion["clustering_tokens"] == metrics[0].tokens > 0
    plain = fuse(m, FusionConfig(ratio=0.25, seed=0))
    assert plain.config.mlpfusion["clustering"] == "data-free"
    with pytest.raises(InvalidConfigError, match="data-aware clustering applies to"):
        fuse(m, FusionConfig(ratio=0.25, method="prune"), metrics=metrics)
    with pytest.raises(InvalidConfigError, match="no statistics for layer"):
        fuse(m, FusionConfig(ratio=0.25, layers=[0, 1]), metrics={0: metrics[0]})


@pytest.fixture
def source(tok, tmp_path):
    src = tmp_path / "src"
    tiny.model("bert", "BertModel", layers=2).save_pretrained(src)
    tok.save_pretrained(src)
    return src


def test_compress_turns_data_aware_clustering_on_with_calibration(source, tmp_path):
    a = compress(str(source), FusionConfig(ratio=0.25, seed=0), tmp_path / "a", calibration="builtin",
                 calibration_samples=16)
    meta = json.loads((a.output / "config.json").read_text())["mlpfusion"]
    assert meta["clustering"] == "data-aware" and meta["calibration"]["samples"] == 16
    assert meta["clustering_tokens"] > 0
    card = (a.output / "README.md").read_text()
    assert "| Clustering | data-aware" in card and "| Calibration | refit: yes" in card
    shown = " ".join(CliRunner().invoke(app, ["info", str(a.output)]).output.split())
    assert "data-aware (MLP input statistics of" in shown and "refit on 16 samples" in shown
    b = compress(str(source), FusionConfig(ratio=0.25, seed=0), tmp_path / "b", calibration="builtin",
                 calibration_samples=16, data_aware=False)
    assert json.loads((b.output / "config.json").read_text())["mlpfusion"]["clustering"] == "data-free"
    # same input and seed, same bytes
    again = compress(str(source), FusionConfig(ratio=0.25, seed=0), tmp_path / "a2", calibration="builtin",
                     calibration_samples=16)
    assert (a.output / "model.safetensors").read_bytes() == (again.output / "model.safetensors").read_bytes()
    assert (a.output / "model.safetensors").read_bytes() != (b.output / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--data-aware"], "needs calibration text"),
    (["--data-aware", "--calibration", "builtin", "--method", "prune"], "applies to fusion and cluster"),
])
def test_cli_refuses_data_aware_where_it_cannot_apply(source, tmp_path, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compress", str(source), "-o", str(out), *args])
    assert res.exit_code != 0
    assert message in " ".join(res.output.split())
    assert not out.exists()
