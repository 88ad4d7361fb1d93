"""DistilBERT: post-LN encoder; MLP in `transformer.layer[i].ffn.lin1` / `.lin2` (nn.Linear)."""

from . import register_family
from .base import Family

DISTILBERT = register_family(Family(
    name="distilbert",
    model_types=("distilbert",),
    blocks="transformer.layer",
    inputs=("ffn.lin1",),
    output="ffn.lin2",
    activation="ffn.activation",
    width_key="hidden_dim",
    depth_key="n_layers",
    hidden_key="dim",
))
