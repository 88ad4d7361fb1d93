"""What an architecture adapter is: where a family keeps its MLPs and how to read/write them.

The pipeline only talks to this interface, so adding a family means adding one adapter file (and,
for the saved format, one configuration/modeling pair in `hf_mlpfusion.modeling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPWeights:
    """One MLP in the canonical (nn.Linear) orientation: f(x) = w2 @ act(w1 @ x + b1) + b2."""

    w1: torch.Tensor  # [p, d]
    b1: torch.Tensor  # [p]
    w2: torch.Tensor  # [d, p]
    b2: torch.Tensor  # [d]

    @property
    def width(self) -> int:
        return self.w1.shape[0]


class Adapter:
    """Base class: subclasses fill in the class attributes and the four small methods."""

    family: str = ""  # "bert"
    model_types: tuple[str, ...] = ()  # stock `model_type`s this adapter reads
    fused_model_type: str = ""  # model_type of the fused config
    heads: tuple[str, ...] = ()  # stock class names of every supported head
    base_class: str = ""  # the stock base model class (used when `architectures` is missing)

    # --- where the MLPs are -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def mlp_modules(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(fc1, fc2) modules of one block."""
        raise NotImplementedError

    # --- how to read and write them -----------------------------------------------------------
    def read(self, block: nn.Module) -> MLPWeights:
        raise NotImplementedError

    def residual_input(self, block: nn.Module) -> nn.Module:
        """The module whose first input is the residual stream that the MLP's output is added to."""
        raise NotImplementedError

    def tensors(self, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fc1.weight, fc1.bias, fc2.weight, fc2.bias in the modules' own storage orientation."""
        raise NotImplementedError

    # --- config -------------------------------------------------------------------------------
    def num_layers(self, config) -> int:
        return int(config.num_hidden_layers)

    def hidden_size(self, config) -> int:
        return int(config.hidden_size)

    def intermediate_size(self, config) -> int:
        return int(config.intermediate_size)

    def stock_width_update(self, width: int) -> dict:
        """Config keys that set one MLP width for every layer in the stock config."""
        return {"intermediate_size": int(width)}

    def fused_class_name(self, stock_name: str) -> str:
        return "MLPFusion" + stock_name


class LinearMLPAdapter(Adapter):
    """BERT-style layers: `layer.intermediate.dense` [p, d] and `layer.output.dense` [d, p]."""

    def blocks(self, model):
        return list(model.base_model.encoder.layer)

    def mlp_modules(self, block):
        return block.intermediate.dense, block.output.dense

    def read(self, block):
        fc1, fc2 = self.mlp_modules(block)
        return MLPWeights(fc1.weight, fc1.bias, fc2.weight, fc2.bias)

    def residual_input(self, block):
        # post-LN: LayerNorm(W2 act(W1 x + b1) + b2 + x): the residual is the MLP's own input
        return block.intermediate.dense

    def tensors(self, w):
        return w.w1, w.b1, w.w2, w.b2
