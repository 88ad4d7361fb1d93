"""ONNX export of fused models, one per MLP kind: linear pair (BERT), Conv1D pair (GPT-2), gated triple
(Llama). `torch.onnx.export` (the torch.export-based exporter, with dynamic batch and sequence
axes), then onnxruntime at a shape and padding the export never saw, against torch. onnx,
onnxruntime and onnxscript (which the exporter needs) come with the test extra."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

import hf_mlpfusion  # noqa: F401
import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import save_fused

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = [("bert", "BertForMaskedLM", "AutoModelForMaskedLM"), ("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM"),
         ("llama", "LlamaForCausalLM", "AutoModelForCausalLM")]


def export(model, path, *, decoder: bool) -> None:
    ids = torch.tensor([[1, 5, 7, 42, 3, 9]])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=60)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if decoder:  # no cache objects in the graph
        kwargs["use_cache"], shapes["use_cache"] = False, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and torchvision notices
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamic_shapes=shapes, dynamo=True,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"])
    program.save(str(path))


@pytest.mark.parametrize("family,head,auto", KINDS)
def test_onnx_export_matches_torch(family, head, auto, tmp_path):
    fused = fuse(tiny.model(family, head), FusionConfig(ratio=0.25, layers=[1, 2], seed=0))
    save_fused(fused, tmp_path / "fused")
    model = getattr(transformers, auto).from_pretrained(tmp_path / "fused").eval()  # as a user loads it
    assert type(model).__name__ == "MLPFusion" + head
    path = tmp_path / "model.onnx"
    export(model, path, decoder=family != "bert")

    graph = onnx.load(str(path)).graph
    shapes = {tuple(init.dims) for init in graph.initializer}
    assert shapes & {(16, 32), (32, 16)}, sorted(shapes)  # fused layers' projections: width 64 * 0.25 = 16
    assert shapes & {(64, 32), (32, 64)}, sorted(shapes)  # and the layer left alone keeps its 64
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, tiny.VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert got.shape == want.shape == (3, 11, tiny.VOCAB)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
