"""Configuration of a BERT model whose MLPs were fused (per-layer widths, frozen count vectors).

Copied next to saved checkpoints for `trust_remote_code=True`; imports transformers only.
"""

from __future__ import annotations

from transformers import BertConfig

from .fused_mlp import normalise_fused_config


class MLPFusionBertConfig(BertConfig):
    """A `BertConfig` plus the per-layer MLP widths and which layers carry a count vector.

    - `intermediate_sizes`: one MLP width per layer (fused layers are narrower).
    - `count_layers`: layers whose output projection scales its input by the frozen cluster sizes.
    - `mlpfusion`: metadata of how the checkpoint was made (method, ratio, layers, seed, source...).
    """

    model_type = "mlpfusion_bert"

    intermediate_sizes: list[int] | None = None
    count_layers: list[int] | None = None
    mlpfusion: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        normalise_fused_config(self, self.num_hidden_layers, self.intermediate_size)


__all__ = ["MLPFusionBertConfig"]
