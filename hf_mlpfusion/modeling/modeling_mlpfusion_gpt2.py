"""GPT-2 model classes with fused MLPs: every head transformers has for GPT-2.

Each class is the stock transformers class; only the MLP modules of the layers are rebuilt at the
widths the config lists (before weights are initialised or loaded). Copied next to saved
checkpoints for `trust_remote_code=True`; imports transformers and its siblings only.
"""

from __future__ import annotations

from transformers import (
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from .configuration_mlpfusion_gpt2 import MLPFusionGPT2Config
from .fused_mlp import resize_conv1d_mlps


class _FusedGPT2:
    config_class = MLPFusionGPT2Config

    def post_init(self):
        # Runs before the weights are initialised or loaded, so the narrow modules get the weights.
        resize_conv1d_mlps(self.base_model.h, self.config)
        super().post_init()


class MLPFusionGPT2Model(_FusedGPT2, GPT2Model):
    pass


class MLPFusionGPT2LMHeadModel(_FusedGPT2, GPT2LMHeadModel):
    pass


class MLPFusionGPT2DoubleHeadsModel(_FusedGPT2, GPT2DoubleHeadsModel):
    pass


class MLPFusionGPT2ForSequenceClassification(_FusedGPT2, GPT2ForSequenceClassification):
    pass


class MLPFusionGPT2ForTokenClassification(_FusedGPT2, GPT2ForTokenClassification):
    pass


class MLPFusionGPT2ForQuestionAnswering(_FusedGPT2, GPT2ForQuestionAnswering):
    pass


# Auto class -> fused class name; written to config.json's `auto_map` and registered on import.
AUTO_MAP = {
    "AutoModel": "MLPFusionGPT2Model",
    "AutoModelForPreTraining": "MLPFusionGPT2LMHeadModel",
    "AutoModelForCausalLM": "MLPFusionGPT2LMHeadModel",
    "AutoModelForSequenceClassification": "MLPFusionGPT2ForSequenceClassification",
    "AutoModelForTokenClassification": "MLPFusionGPT2ForTokenClassification",
    "AutoModelForQuestionAnswering": "MLPFusionGPT2ForQuestionAnswering",
}

__all__ = ["MLPFusionGPT2Config", *AUTO_MAP.values(), "MLPFusionGPT2DoubleHeadsModel"]
