"""Llama and the decoders that share its block (Mistral, Qwen2, Qwen3): pre-RMSNorm, gated SiLU MLP
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` without biases."""

from ..core.mlp import GATED
from . import register_family
from .base import Family

LLAMA = register_family(Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="layers",
    inputs=("mlp.gate_proj", "mlp.up_proj"),
    output="mlp.down_proj",
    activation="mlp.act_fn",
    kind=GATED,
    residual="post_attention_layernorm",  # h + mlp(post_attention_layernorm(h))
    decoder=True,
))
