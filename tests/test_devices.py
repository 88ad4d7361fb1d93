"""Putting calibration on `--device`: what can be checked without a GPU (benchmarks/gpu_check.py runs
the calibrated compress on CUDA, both paths, and checks the blocks come back). The trace moves every
tensor it recorded and keeps the ones that blocks share as one tensor."""

import pytest
import torch

import tiny
from hf_mlpfusion.calibrate import batches
from hf_mlpfusion.families import family_of
from hf_mlpfusion.propagate import trace
from test_evaluate import tiny_tokenizer

TEXTS = ["the cat sat on the mat", "a longer sentence about nothing in particular at all", "short"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _tensors(v, out):
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for u in v:
            _tensors(u, out)
    elif isinstance(v, dict):
        for u in v.values():
            _tensors(u, out)
    return out


@pytest.mark.parametrize("model_type,head", [("llama", "LlamaForCausalLM"), ("bert", "BertModel"), ("gpt2", "GPT2Model")])
def test_trace_to_moves_every_tensor_and_keeps_shared_ones_shared(tok, model_type, head):
    m = tiny.model(model_type, head, layers=3).eval()
    enc = list(batches(TEXTS, tok, max_length=32, batch_size=2, model=m))
    tr = trace(m, family_of(m), enc)
    before = _tensors((tr.hidden, tr.args, tr.kwargs, tr.masks), [])
    assert before and len({id(t) for t in before}) < len(before)  # blocks share some tensors (masks, rotary, ...)
    shared = [(a, b) for a in range(len(before)) for b in range(a + 1, len(before)) if before[a] is before[b]]
    assert tr.to("cpu") is tr and all(x is y for x, y in zip(_tensors((tr.hidden, tr.args, tr.kwargs, tr.masks), []),
                                                              before))  # already there: nothing copied
    tr.to("meta")
    after = _tensors((tr.hidden, tr.args, tr.kwargs, tr.masks), [])
    assert len(after) == len(before) and all(t.is_meta for t in after)
    assert [(t.shape, t.dtype) for t in after] == [(t.shape, t.dtype) for t in before]
    assert all(after[a] is after[b] for a, b in shared)
    assert len({id(t) for t in after}) == len({id(t) for t in before})
