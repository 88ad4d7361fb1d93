"""RoBERTa and the encoders built on it (XLM-RoBERTa, CamemBERT): BERT's layout, and positions that
start after the padding index."""

from . import register_family
from .base import Family

ROBERTA = register_family(Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta", "camembert"),
    blocks="encoder.layer",
    inputs=("intermediate.dense",),
    output="output.dense",
    activation="intermediate.intermediate_act_fn",
    position_offset=lambda config: (config.pad_token_id if config.pad_token_id is not None else 1) + 1,
))
