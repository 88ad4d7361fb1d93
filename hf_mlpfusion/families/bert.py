"""BERT: post-LN encoder; MLP in `encoder.layer[i].intermediate.dense` / `.output.dense` (nn.Linear)."""

from . import register_family
from .base import Family

BERT = register_family(Family(
    name="bert",
    model_types=("bert",),
    blocks="encoder.layer",
    inputs=("intermediate.dense",),
    output="output.dense",
    activation="intermediate.intermediate_act_fn",
))
