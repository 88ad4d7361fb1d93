"""evaluate(): known answers (identical models, ratio-1 fusion), the Adam-NTK, the CLI; data loading."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hf_mlpfusion  # noqa: F401
import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import save_fused
from hf_mlpfusion.data import builtin_chunks, load_labelled_csv, load_texts
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.evaluate import adam_ntk, evaluate

TEXTS = load_texts(None, split="heldout", limit=24)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tokenizer(folder: Path):
    """A real BertTokenizer over 100 ids: special tokens + the most frequent words of the built-in text."""
    from collections import Counter

    from transformers import BertTokenizer

    words = Counter(w for t in load_texts(None, split="all") for w in t.lower().split() if w.isalpha())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(tiny.VOCAB - 5)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("family,head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel"), ("roberta", "RobertaModel")])
def test_identical_models_give_zero_error_and_cosine_one(tok, family, head):
    m = tiny.model(family, head)
    r = evaluate(m, m, TEXTS, tok, ntk_examples=0, latency_repeats=1)
    assert r.hidden_relative_error == 0.0
    assert r.parameters_before == r.parameters_after and r.parameter_ratio == 1.0
    if family == "gpt2":
        assert r.cosine_mean is None and r.perplexity_before is not None
        assert r.perplexity_before == pytest.approx(r.perplexity_after, rel=1e-12) and r.perplexity_before > 1
    else:
        assert r.cosine_mean == pytest.approx(1.0, abs=1e-6) and r.cosine_min == pytest.approx(1.0, abs=1e-6)
    if head.endswith("ForMaskedLM"):
        assert r.mlm_loss_before is not None and r.mlm_loss_before > 0
        assert r.mlm_loss_before == pytest.approx(r.mlm_loss_after, rel=1e-12)
    assert r.latency_ratio is not None and r.latency_ratio > 0


@pytest.mark.parametrize("family,head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel")])
def test_ratio_one_fusion_has_zero_ntk_error_and_lower_ratio_does_not(tok, family, head):
    m = tiny.model(family, head)
    exact = fuse(m, FusionConfig(ratio=1.0, layers=[0, 2], seed=0))
    r = evaluate(m, exact, TEXTS, tok, ntk_examples=6, latency_repeats=0)
    assert set(r.ntk_error) == {0, 2} and r.ntk_examples == 6
    assert max(r.ntk_error.values()) < 1e-5
    assert r.hidden_relative_error < 1e-5
    small = fuse(m, FusionConfig(ratio=0.25, layers=[0, 2], seed=0))
    r2 = evaluate(m, small, TEXTS, tok, ntk_examples=6, latency_repeats=0)
    assert min(r2.ntk_error.values()) > 1e-3
    assert r2.hidden_relative_error > 1e-4
    assert r2.parameters_after < r2.parameters_before
    if family == "gpt2":
        assert r2.perplexity_after != pytest.approx(r2.perplexity_before, rel=1e-9)
    else:
        assert r2.cosine_mean < 1.0 and r2.mlm_loss_after != pytest.approx(r2.mlm_loss_before, rel=1e-9)


def test_adam_ntk_known_answer():
    G = torch.tensor([[1.0, -2.0, 0.0], [0.5, 3.0, -1.0]], dtype=torch.float64)
    expected = torch.tensor([[1 + 2 + 0, 1 - 2 + 0], [0.5 - 3, 0.5 + 3 + 1]], dtype=torch.float64)
    assert torch.equal(adam_ntk(G), expected)


def test_report_json_is_valid_without_nan(tok):
    m = tiny.model("bert")
    f = fuse(m, FusionConfig(ratio=0.5, layers=[1]))
    d = json.loads(evaluate(m, f, TEXTS, tok, ntk_examples=2, latency_repeats=0).to_json())
    assert d["ntk_error"].keys() == {"1"} and d["perplexity_before"] is None and 0 < d["parameter_ratio"] < 1


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("eval")
    m = tiny.model("bert", "BertForMaskedLM")
    m.save_pretrained(root / "orig")
    tok.save_pretrained(root / "orig")
    save_fused(fuse(m, FusionConfig(ratio=0.5, layers=[0, 1])), root / "fused", source_dir=root / "orig")
    return root


def _cli(*args):
    from hf_mlpfusion.cli.main import app

    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_cli_prints_a_table(folders):
    res = _cli(folders / "orig", folders / "fused", "--samples", 12, "--ntk-examples", 3)
    assert res.exit_code == 0, res.output
    for needle in ("relative error", "embedding cosine", "masked-LM loss", "Adam-NTK relative error, layer 1", "parameters"):
        assert needle in res.output


def test_cli_json_and_text_file(folders, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the value of the object\n\nan instance of a class is returned\nthe name is bound to the object\n")
    res = _cli(folders / "orig", folders / "fused", "--text", f, "--ntk-examples", 2, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["samples"] == 3 and set(d["ntk_error"]) == {"0", "1"} and 0 <= d["hidden_relative_error"] < 1
    assert d["cosine_mean"] <= 1.0 and d["mlm_loss_before"] > 0


def test_cli_csv_and_errors(folders, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nthe object is bound,1\na class of names,0\n")
    res = _cli(folders / "orig", folders / "fused", "--csv", csv, "--ntk-examples", 0, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["samples"] == 2
    missing = _cli(folders / "orig", tmp_path / "nope")
    assert missing.exit_code == 1 and "no such folder" in missing.output and "Traceback" not in missing.output
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    res = _cli(folders / "orig", folders / "fused", "--text", empty)
    assert res.exit_code == 1 and "has no text: put one sample per line" in res.output  # the reader --calibration uses


# --- data ---------------------------------------------------------------------------------------


def test_builtin_splits_are_disjoint_and_stable():
    cal, held = builtin_chunks()
    assert len(cal) >= 256 and len(held) >= 400
    assert not set(cal) & set(held)
    assert load_texts(None, split="heldout", limit=5) == list(held[:5])
    assert load_texts(None, split="calibration", limit=300)[:10] == load_texts(None, limit=10)
    assert all(len(t.split()) >= 6 for t in cal[:100])
    with pytest.raises(InvalidConfigError):
        load_texts(None, split="train")


def test_text_file_and_errors(tmp_path):
    with pytest.raises(InvalidConfigError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "a.txt").write_text("one\n\n two \nthree\n")
    assert load_texts(tmp_path / "a.txt") == ["one", "two", "three"]
    assert load_texts(tmp_path / "a.txt", limit=2) == ["one", "two"]


def test_labelled_csv_tweets_and_generic(tmp_path):
    tweets = load_labelled_csv()
    assert tweets.label_names == ["negative", "positive"]
    assert len(tweets) > 20000 and set(tweets.labels) == {0, 1}
    assert 0.2 < sum(tweets.labels) / len(tweets) < 0.5  # 6954 positive of 23140
    (tmp_path / "g.csv").write_text("sentence,label\ngood,1\nbad,0\n,1\nok,2\n")
    g = load_labelled_csv(tmp_path / "g.csv")
    assert g.texts == ["good", "bad", "ok"] and g.labels == [1, 0, 2] and g.label_names == ["0", "1", "2"]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InvalidConfigError, match="text column"):
        load_labelled_csv(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InvalidConfigError, match="no data rows"):
        load_labelled_csv(tmp_path / "empty.csv")
