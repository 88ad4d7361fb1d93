"""GPT-2: pre-LN decoder; MLP in `h[i].mlp.c_fc` / `.c_proj`, `Conv1D` modules (weights stored transposed)."""

from . import register_family
from .base import Family

GPT2 = register_family(Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks="h",
    inputs=("mlp.c_fc",),
    output="mlp.c_proj",
    activation="mlp.act",
    residual="ln_2",  # h + mlp(ln_2(h)): the residual stream is ln_2's input
    width_key="n_inner",
    depth_key="n_layer",
    hidden_key="n_embd",
    default_width=lambda config: 4 * config.n_embd,  # n_inner None means 4 d
    decoder=True,
    extra_heads=("GPT2DoubleHeadsModel",),
))
