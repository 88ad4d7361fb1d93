"""Per-layer width allocation: the knapsack is exact, the budget holds, widths go where they cost the
most, and `compress --allocate` records and saves the chosen widths."""

import itertools
import json
import random

import pytest
import torch

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.allocate import allocate, candidate_widths, choose
from hf_mlpfusion.compress import compress
from hf_mlpfusion.config import round_width
from hf_mlpfusion.data import load_texts
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.families import family_for
from test_evaluate import tiny_tokenizer

TEXTS = load_texts(None, split="calibration", limit=32)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_choose_is_the_exact_optimum_of_the_knapsack():
    rng = random.Random(0)
    for _ in range(30):
        layers = rng.randint(1, 4)
        errors = {i: {w: rng.random() for w in rng.sample([8, 16, 24, 32, 48], rng.randint(1, 4))} for i in range(layers)}
        budget = rng.choice([16, 40, 64, 100])
        best = None
        for combo in itertools.product(*[sorted(errors[i].items()) for i in range(layers)]):
            if sum(w for w, _ in combo) <= budget:
                e = sum(v for _, v in combo)
                best = e if best is None or e < best else best
        if best is None:
            with pytest.raises(InvalidConfigError):
                choose(errors, budget)
            continue
        got = choose(errors, budget)
        assert sum(got.values()) <= budget
        assert sum(errors[i][w] for i, w in got.items()) == pytest.approx(best)


def test_candidates_and_rounding():
    assert round_width(100, 1536, 64) == 128 and round_width(10, 1536, 64) == 64 and round_width(1500, 1536, 64) == 1472 and round_width(1530, 1536, 64) == 1536
    assert candidate_widths(64, 16, 1) == [8, 12, 16, 24, 32]
    assert candidate_widths(64, 16, 8) == [8, 16, 24, 32]
    assert FusionConfig(ratio=0.25, width_multiple=8).width_for(100) == 24  # 25 -> 24
    with pytest.raises(InvalidConfigError, match="width multiple"):
        FusionConfig(width_multiple=0)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_allocation_keeps_the_budget_and_widens_the_layer_that_matters(tok, model_type):
    m = tiny.model(model_type, tiny.HEADS[model_type][0], layers=3)
    family = family_for(model_type)
    with torch.no_grad():  # layer 1's MLP now writes 20x more into the residual stream
        family.projections(family.block_list(m)[1])[1].weight.mul_(20)
    cfg = FusionConfig(ratio=0.25, seed=0)
    alloc = allocate(m, cfg, TEXTS, tok)
    assert alloc.budget == 48 and alloc.total <= 48
    assert alloc.widths[1] > 16 and alloc.widths[1] == max(alloc.widths.values())
    summary = alloc.summary()
    assert summary["error"] <= summary["error_uniform"]
    for i, errs in alloc.errors.items():  # more width never costs more (the refit can only do better)
        ws = sorted(errs)
        assert all(errs[a] >= errs[b] - 1e-9 for a, b in zip(ws, ws[1:]))
    fused = fuse(m, FusionConfig(ratio=0.25, seed=0, widths=alloc.widths), precomputed=alloc.reductions)
    again = fuse(m, FusionConfig(ratio=0.25, seed=0, widths=alloc.widths))
    assert fused.config.intermediate_sizes == [alloc.widths[i] for i in range(3)]
    for (k, a), (_, b) in zip(fused.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k  # the cached reductions are the ones fuse would make


def test_allocation_errors_are_the_same_every_run(tok):
    """Same input, same bytes: the errors are recorded in config.json (torch.linalg.lstsq gave other
    last bits on every call on the CPU)."""
    m = tiny.model("bert", "BertModel", layers=3)
    runs = [allocate(m, FusionConfig(ratio=0.25, seed=0), TEXTS, tok).errors for _ in range(4)]
    assert all(r == runs[0] for r in runs[1:])


def test_compress_allocate_records_the_widths(tok, tmp_path):
    src = tmp_path / "src"
    tiny.model("bert", "BertModel", layers=3).save_pretrained(src)
    tok.save_pretrained(src)
    res = compress(str(src), FusionConfig(ratio=0.25, width_multiple=8), tmp_path / "out", calibration="builtin",
                   calibration_samples=16, allocate=True)
    meta = json.loads((res.output / "config.json").read_text())["mlpfusion"]
    assert sum(meta["widths_after"]) <= 48 and all(w % 8 == 0 for w in meta["widths_after"])
    assert meta["allocation"]["budget"] == 48 and meta["allocation"]["widths"] == {
        str(i): w for i, w in enumerate(meta["widths_after"])}
    with pytest.raises(InvalidConfigError, match="--allocate"):
        compress(str(src), FusionConfig(ratio=0.25), tmp_path / "out2", allocate=True)


def test_info_and_card_show_the_allocation(tok, tmp_path):
    from typer.testing import CliRunner

    from hf_mlpfusion.cli.main import app

    src = tmp_path / "src"
    tiny.model("bert", "BertModel", layers=3).save_pretrained(src)
    tok.save_pretrained(src)
    res = compress(str(src), FusionConfig(ratio=0.25), tmp_path / "out", calibration="builtin", calibration_samples=16,
                   allocate=True)
    text = " ".join(CliRunner().invoke(app, ["info", str(res.output)]).output.split())
    assert "chosen per layer from measured cost" in text and "a budget of 48" in text
    card = (res.output / "README.md").read_text()
    assert "| Width allocation | per layer" in card
