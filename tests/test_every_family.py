"""Everything beyond fusing works for every model type of the registry: data-aware clustering,
calibration with distillation, evaluate (perplexity for decoders, masked-LM loss for encoders),
`info`, the model card, and one-line errors for what is not supported."""

import json

import pytest
import torch
from typer.testing import CliRunner

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.calibrate import calibrate, data_metrics
from hf_mlpfusion.cli.main import app
from hf_mlpfusion.compress import save_fused
from hf_mlpfusion.data import load_texts
from hf_mlpfusion.evaluate import evaluate
from hf_mlpfusion.families import family_for
from test_evaluate import tiny_tokenizer

TEXTS = load_texts(None, split="calibration", limit=24)
CASES = tiny.one_head_per_type()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("model_type,head", CASES)
def test_data_aware_fusion_and_distillation_lower_the_error(tok, model_type, head):
    m = tiny.model(model_type, head)
    metrics = data_metrics(m, [1], TEXTS, tok)
    in_scales = metrics[1].in_scales
    assert in_scales.shape == (len(family_for(model_type).inputs),) and bool((in_scales > 0).all())
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[1], seed=0), metrics=metrics)
    assert fused.config.mlpfusion["clustering"] == "data-aware"
    summary = calibrate(m, fused, TEXTS, tok, refit=True, distill_steps=10)
    (entry,) = summary["layers"]
    assert entry["error_after"] < entry["error_before"]


@pytest.mark.parametrize("model_type,head", CASES)
def test_evaluate_reports_the_measures_of_the_head(tok, model_type, head):
    m = tiny.model(model_type, head)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[0, 2], seed=0))
    r = evaluate(m, fused, TEXTS[:8], tok, ntk_examples=2, latency_repeats=0)
    assert r.hidden_relative_error > 0 and sorted(r.ntk_error) == [0, 2]
    if family_for(model_type).decoder:
        assert r.cosine_mean is None and r.perplexity_after > 1 and r.mlm_loss_after is None
    else:
        assert -1 <= r.cosine_mean < 1 and r.mlm_loss_after > 0 and r.perplexity_after is None


@pytest.mark.parametrize("model_type,head", CASES)
def test_info_and_card_describe_every_family(tmp_path, model_type, head):
    fused = fuse(tiny.model(model_type, head), FusionConfig(ratio=0.5, layers=[1], seed=0))
    save_fused(fused, tmp_path / "out")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"mlpfusion_{model_type}" in text and "64 32 64" in text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 1 | 64 | 32 |" in card
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["mlp_layout"]["inputs"] == list(family_for(model_type).inputs)
    assert torch.equal(torch.tensor(cfg["intermediate_sizes"]), torch.tensor([64, 32, 64]))


@pytest.mark.parametrize("model_type,head", CASES)
def test_statistics_from_hooks_equal_the_statistics_of_captured_inputs(tok, model_type, head):
    """data_metrics takes the pre-activations from the model's own projections, in length-sorted
    batches; the statistics of inputs captured in plain batches, with the products recomputed, agree."""
    from hf_mlpfusion.calibrate import batches, capture_mlp_inputs
    from hf_mlpfusion.core.metric import MetricStats
    from hf_mlpfusion.families import family_of

    m = tiny.model(model_type, head)
    family = family_of(m)
    layer = family.num_layers(m.config) - 1
    got = data_metrics(m, [layer], TEXTS, tok)[layer]
    block = family.block_list(m)[layer]
    stats = MetricStats(family.read(block), family.act(block))
    x = capture_mlp_inputs(m, layer, list(batches(TEXTS, tok, max_length=128, batch_size=16, model=m)))
    stats.add(x)  # one batch, pre-activations recomputed here
    want = stats.metric()
    assert got.tokens == want.tokens == x.shape[0]
    S, T = got.chol @ got.chol.T, want.chol @ want.chol.T  # (the last pivots of a near-singular S are not stable)
    assert torch.allclose(S, T, rtol=1e-4, atol=1e-6 * float(T.diagonal().mean()))
    assert torch.allclose(got.in_scales, want.in_scales, rtol=1e-4)
    assert float(got.out_scale) == pytest.approx(float(want.out_scale), rel=1e-4)


def test_length_sorted_batches_hold_the_same_tokens_with_less_padding(tok):
    from hf_mlpfusion.calibrate import batches

    texts = [("word " * n).strip() for n in (40, 1, 25, 3, 40, 2, 30, 1)]
    plain = list(batches(texts, tok, max_length=64, batch_size=2))
    ordered = list(batches(texts, tok, max_length=64, batch_size=2, by_length=True))
    assert sum(int(b["attention_mask"].sum()) for b in plain) == sum(int(b["attention_mask"].sum()) for b in ordered)
    assert sum(b["attention_mask"].numel() for b in ordered) < sum(b["attention_mask"].numel() for b in plain)
    lengths = [int(n) for b in ordered for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)
    again = list(batches(texts, tok, max_length=64, batch_size=2, by_length=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ordered, again))
