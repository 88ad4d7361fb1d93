"""Building blocks shared by the fused model classes.

This file is copied next to every saved checkpoint (with the configuration/modeling files of its
family) so that `trust_remote_code=True` loads a fused model without hf_mlpfusion installed. It may
import torch and transformers only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D


class CountScaledLinear(nn.Linear):
    """`nn.Linear` whose input is scaled by a frozen per-neuron count vector.

    This is the output projection W2' of a fused MLP: f'(x) = W2' (n * act(W1' x + b1')) + b2.
    `counts` is a persistent buffer: saved in the safetensors file, moved by `.to()`, never trained.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("counts", torch.ones(in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.counts, self.weight, self.bias)


class CountScaledConv1D(Conv1D):
    """GPT-2's transposed `Conv1D` with the same frozen count vector on its input."""

    def __init__(self, nf: int, nx: int):
        super().__init__(nf, nx)
        self.register_buffer("counts", torch.ones(nx, dtype=self.weight.dtype, device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.counts)


def normalise_fused_config(config, num_layers: int, base_width: int) -> None:
    """Fill in and clean the fused-config fields (called from each fused config's __post_init__)."""
    if config.intermediate_sizes is None:
        config.intermediate_sizes = [int(base_width)] * num_layers
    config.intermediate_sizes = [int(s) for s in config.intermediate_sizes]
    config.count_layers = sorted(int(i) for i in (config.count_layers or []))
    config.mlpfusion = dict(config.mlpfusion or {})


def check_widths(config, num_layers: int) -> tuple[list[int], set[int]]:
    """Validate `intermediate_sizes` / `count_layers` of a fused config and return them."""
    sizes = list(config.intermediate_sizes)
    if len(sizes) != num_layers:
        raise ValueError(f"intermediate_sizes has {len(sizes)} entries but the model has {num_layers} layers")
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"every intermediate size must be at least 1, got {sizes}")
    counted = {int(i) for i in (config.count_layers or [])}
    if any(i < 0 or i >= num_layers for i in counted):
        raise ValueError(f"count_layers {sorted(counted)} out of range for {num_layers} layers")
    return [int(s) for s in sizes], counted


def resize_linear_mlps(layers, config) -> None:
    """BERT-style layers: `layer.intermediate.dense` (W1, [p, d]) and `layer.output.dense` (W2, [d, p])."""
    sizes, counted = check_widths(config, len(layers))
    for i, layer in enumerate(layers):
        fc1, fc2 = layer.intermediate.dense, layer.output.dense
        if fc1.out_features == sizes[i] and i not in counted:
            continue
        d = fc1.in_features
        layer.intermediate.dense = nn.Linear(d, sizes[i], bias=fc1.bias is not None)
        out_cls = CountScaledLinear if i in counted else nn.Linear
        layer.output.dense = out_cls(sizes[i], fc2.out_features, bias=fc2.bias is not None)


def resize_conv1d_mlps(blocks, config) -> None:
    """GPT-2 blocks: `block.mlp.c_fc` (Conv1D, weight [d, p]) and `block.mlp.c_proj` (weight [p, d])."""
    sizes, counted = check_widths(config, len(blocks))
    for i, block in enumerate(blocks):
        mlp = block.mlp
        if mlp.c_fc.nf == sizes[i] and i not in counted:
            continue
        d = mlp.c_fc.nx
        mlp.c_fc = Conv1D(sizes[i], d)
        mlp.c_proj = (CountScaledConv1D if i in counted else Conv1D)(mlp.c_proj.nf, sizes[i])
