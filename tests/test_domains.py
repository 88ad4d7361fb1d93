"""evaluate on several domains at once: one report per domain, from the built-in held-out splits."""

import pytest

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.evaluate import evaluate, evaluate_domains
from hf_mlpfusion.text import heldout_texts
from test_evaluate import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_report_per_domain_matching_a_single_evaluate(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    m = tiny.model("bert", "BertModel")
    fused = fuse(m, FusionConfig(ratio=0.25, seed=0))
    reports = evaluate_domains(m, fused, "builtin:bible,wordnet", tok, samples=8, ntk_examples=2, latency_repeats=0)
    assert list(reports) == ["bible", "wordnet"]
    assert reports["bible"].ntk_error and not reports["wordnet"].ntk_error  # the NTK once, on the first
    texts = heldout_texts(["wordnet"], limit=8)["wordnet"]
    alone = evaluate(m, fused, texts, tok, ntk_examples=0, latency_repeats=0)
    assert reports["wordnet"].cosine_mean == pytest.approx(alone.cosine_mean, abs=1e-6)
    assert reports["wordnet"].tokens == alone.tokens != reports["bible"].tokens  # each on its own text
    with pytest.raises(InvalidConfigError):
        evaluate_domains(m, fused, {}, tok)
