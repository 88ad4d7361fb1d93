"""Tiny random models of every supported family and head, and inputs that fit them (tests only)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 100

HEADS = {
    "bert": [
        "BertModel", "BertForPreTraining", "BertLMHeadModel", "BertForMaskedLM",
        "BertForNextSentencePrediction", "BertForSequenceClassification", "BertForMultipleChoice",
        "BertForTokenClassification", "BertForQuestionAnswering",
    ],
    "roberta": [
        "RobertaModel", "RobertaForCausalLM", "RobertaForMaskedLM", "RobertaForSequenceClassification",
        "RobertaForMultipleChoice", "RobertaForTokenClassification", "RobertaForQuestionAnswering",
    ],
    "gpt2": [
        "GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
        "GPT2ForTokenClassification", "GPT2ForQuestionAnswering",
    ],
}

AUTO_FOR_HEAD = {
    "Model": "AutoModel",
    "ForPreTraining": "AutoModelForPreTraining",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForCausalLM": "AutoModelForCausalLM",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForNextSentencePrediction": "AutoModelForNextSentencePrediction",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForMultipleChoice": "AutoModelForMultipleChoice",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "DoubleHeadsModel": None,  # transformers has no Auto class for it: loaded by class
}


def auto_class_name(head: str) -> str | None:
    for suffix in sorted(AUTO_FOR_HEAD, key=len, reverse=True):
        if head.endswith(suffix):
            return AUTO_FOR_HEAD[suffix]
    raise KeyError(head)


def config(family: str, layers: int = 3, width: int = 64, hidden: int = 32):
    if family == "bert":
        return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                       intermediate_size=width, vocab_size=VOCAB, max_position_embeddings=64)
    if family == "roberta":
        return transformers.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                          intermediate_size=width, vocab_size=VOCAB, max_position_embeddings=70)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_inner=width, vocab_size=VOCAB,
                                       n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    raise KeyError(family)


def model(family: str, head: str | None = None, seed: int = 0, **kw):
    head = head or HEADS[family][0]
    cfg = config(family, **kw)
    if head.endswith(("LMHeadModel", "ForCausalLM")) and family != "gpt2":
        cfg.is_decoder = True
    torch.manual_seed(seed)
    return getattr(transformers, head)(cfg).eval()


def inputs(head: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if head.endswith("ForMultipleChoice"):
        return {"input_ids": ids.unsqueeze(1).expand(batch, 3, length).contiguous()}
    if head.endswith("DoubleHeadsModel"):
        return {"input_ids": ids.unsqueeze(1).expand(batch, 2, length).contiguous(),
                "mc_token_ids": torch.full((batch, 2), length - 1)}
    return {"input_ids": ids}


def outputs(m, head: str) -> list[torch.Tensor]:
    """Every tensor the forward pass returns (caches left out)."""
    with torch.no_grad():
        out = m(**inputs(head))
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a, (len(a), len(b))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
