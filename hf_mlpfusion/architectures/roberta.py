"""RoBERTa: the same MLP layout as BERT (`intermediate.dense` / `output.dense`)."""

from .base import LinearMLPAdapter


class RobertaAdapter(LinearMLPAdapter):
    family = "roberta"
    model_types = ("roberta",)
    fused_model_type = "mlpfusion_roberta"
    base_class = "RobertaModel"
    heads = (
        "RobertaModel",
        "RobertaForCausalLM",
        "RobertaForMaskedLM",
        "RobertaForSequenceClassification",
        "RobertaForMultipleChoice",
        "RobertaForTokenClassification",
        "RobertaForQuestionAnswering",
    )
