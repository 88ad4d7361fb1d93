"""RoBERTa model classes with fused MLPs: every head transformers has for RoBERTa.

Each class is the stock transformers class; only the MLP modules of the layers are rebuilt at the
widths the config lists (before weights are initialised or loaded). Copied next to saved
checkpoints for `trust_remote_code=True`; imports transformers and its siblings only.
"""

from __future__ import annotations

from transformers import (
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)

from .configuration_mlpfusion_roberta import MLPFusionRobertaConfig
from .fused_mlp import resize_linear_mlps


class _FusedRoberta:
    config_class = MLPFusionRobertaConfig

    def post_init(self):
        # Runs before the weights are initialised or loaded, so the narrow modules get the weights.
        resize_linear_mlps(self.base_model.encoder.layer, self.config)
        super().post_init()


class MLPFusionRobertaModel(_FusedRoberta, RobertaModel):
    pass


class MLPFusionRobertaForCausalLM(_FusedRoberta, RobertaForCausalLM):
    pass


class MLPFusionRobertaForMaskedLM(_FusedRoberta, RobertaForMaskedLM):
    pass


class MLPFusionRobertaForSequenceClassification(_FusedRoberta, RobertaForSequenceClassification):
    pass


class MLPFusionRobertaForMultipleChoice(_FusedRoberta, RobertaForMultipleChoice):
    pass


class MLPFusionRobertaForTokenClassification(_FusedRoberta, RobertaForTokenClassification):
    pass


class MLPFusionRobertaForQuestionAnswering(_FusedRoberta, RobertaForQuestionAnswering):
    pass


# Auto class -> fused class name; written to config.json's `auto_map` and registered on import.
AUTO_MAP = {
    "AutoModel": "MLPFusionRobertaModel",
    "AutoModelForPreTraining": "MLPFusionRobertaForMaskedLM",
    "AutoModelForCausalLM": "MLPFusionRobertaForCausalLM",
    "AutoModelForMaskedLM": "MLPFusionRobertaForMaskedLM",
    "AutoModelForSequenceClassification": "MLPFusionRobertaForSequenceClassification",
    "AutoModelForMultipleChoice": "MLPFusionRobertaForMultipleChoice",
    "AutoModelForTokenClassification": "MLPFusionRobertaForTokenClassification",
    "AutoModelForQuestionAnswering": "MLPFusionRobertaForQuestionAnswering",
}

__all__ = ["MLPFusionRobertaConfig", *AUTO_MAP.values()]
