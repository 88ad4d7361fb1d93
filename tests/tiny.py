"""Tiny random models of every supported model type and head, and inputs that fit them (tests only).

Everything here is derived from the family registry (`hf_mlpfusion.families`) and transformers' own
config classes, so a family added to the registry is picked up by every test that parametrizes
over `MODEL_TYPES` / `HEADS` without an edit here.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hf_mlpfusion.families import family_for, model_types
from tiny_io import VOCAB, inputs, max_diff, outputs  # noqa: F401

MODEL_TYPES = model_types()

# the names configs use for the number of attention heads, key/value heads and positions
_HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads")
_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def heads(model_type: str) -> list[str]:
    """Every head the registry lists for a model type, base model first."""
    family = family_for(model_type)
    base = family.base_class(model_type)
    return [base] + sorted(h for h in family.heads(model_type) if h != base)


HEADS = {mt: heads(mt) for mt in MODEL_TYPES}
CASES = [(mt, h) for mt in MODEL_TYPES for h in HEADS[mt]]  # every (model type, head)


def auto_class_name(model_type: str, head: str) -> str | None:
    """The Auto class that loads `head` (None for heads no Auto class maps to)."""
    return family_for(model_type).heads(model_type)[head]


def one_head_per_type() -> list[tuple[str, str]]:
    """The language-model head of each model type (causal for decoders, masked for encoders), else its
    base model: one case per model type."""
    out = []
    for mt in MODEL_TYPES:
        heads = family_for(mt).heads(mt)
        want = "AutoModelForCausalLM" if family_for(mt).decoder else "AutoModelForMaskedLM"
        out.append((mt, next((h for h, auto in heads.items() if auto == want), HEADS[mt][0])))
    return out


def config(model_type: str, layers: int = 3, width: int = 64, hidden: int = 32):
    family = family_for(model_type)
    cfg = CONFIG_MAPPING[model_type]()
    values = {family.hidden_key: hidden, family.width_key: width, family.depth_key: layers, "vocab_size": VOCAB}
    for key in _HEAD_KEYS:
        if hasattr(cfg, key):
            values[key] = 2
    if hasattr(cfg, "num_key_value_heads"):
        values["num_key_value_heads"] = 1
    if hasattr(cfg, "head_dim"):
        values["head_dim"] = hidden // 2
    offset = family.position_offset(cfg) if family.position_offset else 0
    for key in _POSITION_KEYS:
        if hasattr(cfg, key):
            values[key] = 64 + offset
    if hasattr(cfg, "layer_types"):
        values["layer_types"] = None  # sized by the number of layers: let the config rebuild it
    if hasattr(cfg, "max_window_layers"):
        values["max_window_layers"] = layers
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= VOCAB:
            values[key] = 0
    if getattr(cfg, "pad_token_id", None) is None or cfg.pad_token_id >= VOCAB:
        values["pad_token_id"] = 0
    data = {**cfg.to_dict(), **values}
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    return type(cfg)(**data)


def model(model_type: str, head: str | None = None, seed: int = 0, **kw):
    head = head or HEADS[model_type][0]
    cfg = config(model_type, **kw)
    if not family_for(model_type).decoder and auto_class_name(model_type, head) == "AutoModelForCausalLM":
        cfg.is_decoder = True  # encoders' causal-LM heads want it
    torch.manual_seed(seed)
    return getattr(transformers, head)(cfg).eval()
