"""BERT model classes with fused MLPs: every head transformers has for BERT.

Each class is the stock transformers class; only the MLP modules of the layers are rebuilt at the
widths the config lists (before weights are initialised or loaded). Copied next to saved
checkpoints for `trust_remote_code=True`; imports transformers and its siblings only.
"""

from __future__ import annotations

from transformers import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
)

from .configuration_mlpfusion_bert import MLPFusionBertConfig
from .fused_mlp import resize_linear_mlps


class _FusedBert:
    config_class = MLPFusionBertConfig

    def post_init(self):
        # Runs before the weights are initialised or loaded, so the narrow modules get the weights.
        resize_linear_mlps(self.base_model.encoder.layer, self.config)
        super().post_init()


class MLPFusionBertModel(_FusedBert, BertModel):
    pass


class MLPFusionBertForPreTraining(_FusedBert, BertForPreTraining):
    pass


class MLPFusionBertLMHeadModel(_FusedBert, BertLMHeadModel):
    pass


class MLPFusionBertForMaskedLM(_FusedBert, BertForMaskedLM):
    pass


class MLPFusionBertForNextSentencePrediction(_FusedBert, BertForNextSentencePrediction):
    pass


class MLPFusionBertForSequenceClassification(_FusedBert, BertForSequenceClassification):
    pass


class MLPFusionBertForMultipleChoice(_FusedBert, BertForMultipleChoice):
    pass


class MLPFusionBertForTokenClassification(_FusedBert, BertForTokenClassification):
    pass


class MLPFusionBertForQuestionAnswering(_FusedBert, BertForQuestionAnswering):
    pass


# Auto class -> fused class name; written to config.json's `auto_map` and registered on import.
AUTO_MAP = {
    "AutoModel": "MLPFusionBertModel",
    "AutoModelForPreTraining": "MLPFusionBertForPreTraining",
    "AutoModelForCausalLM": "MLPFusionBertLMHeadModel",
    "AutoModelForMaskedLM": "MLPFusionBertForMaskedLM",
    "AutoModelForNextSentencePrediction": "MLPFusionBertForNextSentencePrediction",
    "AutoModelForSequenceClassification": "MLPFusionBertForSequenceClassification",
    "AutoModelForMultipleChoice": "MLPFusionBertForMultipleChoice",
    "AutoModelForTokenClassification": "MLPFusionBertForTokenClassification",
    "AutoModelForQuestionAnswering": "MLPFusionBertForQuestionAnswering",
}

__all__ = ["MLPFusionBertConfig", *AUTO_MAP.values()]
