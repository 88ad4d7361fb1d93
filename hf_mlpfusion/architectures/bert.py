"""BERT: MLPs in `encoder.layer[i].intermediate.dense` / `.output.dense` (nn.Linear)."""

from .base import LinearMLPAdapter


class BertAdapter(LinearMLPAdapter):
    family = "bert"
    model_types = ("bert",)
    fused_model_type = "mlpfusion_bert"
    base_class = "BertModel"
    heads = (
        "BertModel",
        "BertForPreTraining",
        "BertLMHeadModel",
        "BertForMaskedLM",
        "BertForNextSentencePrediction",
        "BertForSequenceClassification",
        "BertForMultipleChoice",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    )
