"""What a model family is: where its MLPs are, what kind they are, and the config keys that size them.

A `Family` is data. Everything the rest of the package needs to know about a family is derived
from it here: the blocks and MLP modules of a model, its MLP weights as `core.mlp.MLPTensors`,
the tensors to write back, the residual stream, widths, depth, the heads transformers has for it,
and the `mlp_layout` saved in a fused config.json (which the generic modeling code reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.mlp import LINEAR, MLPTensors
from ..modeling.modeling_mlpfusion import get_path, set_path, stock_heads
from ..modeling.configuration_mlpfusion import FORMAT


@dataclass(frozen=True)
class Family:
    """One family of model types that keep their MLPs in the same places.

    Paths are attribute paths: `blocks` below the base model (`model.base_model`), the others
    below one block. Projections may be `nn.Linear` or GPT-2's transposed `Conv1D`.
    """

    name: str  # "llama"
    model_types: tuple[str, ...]  # the stock `model_type`s it reads: ("llama", "mistral", ...)
    blocks: str  # "layers"
    inputs: tuple[str, ...]  # input projections of a block: ("mlp.gate_proj", "mlp.up_proj")
    output: str  # output projection of a block: "mlp.down_proj"
    activation: str  # the activation module of a block: "mlp.act_fn"
    kind: str = LINEAR  # "linear" (act(W1 x + b1)) or "gated" (act(W_gate x) * W_up x); see core.mlp
    # the module whose first input is the residual stream the MLP's output is added to; None when the
    # MLP's own input is that stream (post-LN blocks: BERT's LayerNorm(MLP(x) + x))
    residual: str | None = None
    width_key: str = "intermediate_size"
    depth_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    default_width: Callable | None = None  # config -> width, when config[width_key] is None (GPT-2: 4 d)
    decoder: bool = False  # a causal LM family: evaluated by perplexity
    position_offset: Callable | None = None  # config -> positions used before the text (RoBERTa: pad + 1)
    extra_heads: tuple[str, ...] = ()  # heads that no Auto class maps to (GPT2DoubleHeadsModel)

    # --- config -----------------------------------------------------------------------------------
    def num_layers(self, config) -> int:
        return int(getattr(config, self.depth_key))

    def hidden_size(self, config) -> int:
        return int(getattr(config, self.hidden_key))

    def intermediate_size(self, config) -> int:
        width = getattr(config, self.width_key, None)
        if width is None and self.default_width is not None:
            width = self.default_width(config)
        return int(width)

    def stock_width_update(self, width: int) -> dict:
        """Config keys that give every layer of the stock config one MLP width."""
        return {self.width_key: int(width)}

    def max_positions(self, config) -> int:
        n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
        return int(n) - (self.position_offset(config) if self.position_offset is not None else 0)

    def layout(self) -> dict:
        """`mlp_layout` of a fused config.json: what the generic modeling code needs to rebuild the MLPs."""
        return {"format": FORMAT, "kind": self.kind, "blocks": self.blocks, "inputs": list(self.inputs),
                "output": self.output, "activation": self.activation}

    # --- heads --------------------------------------------------------------------------------------
    def heads(self, model_type: str) -> dict[str, str | None]:
        """Stock class name -> its Auto class (None for the extra heads no Auto class maps to)."""
        out: dict[str, str | None] = {}
        for auto, cls in stock_heads(model_type).items():
            out.setdefault(cls, auto)
        for cls in self.extra_heads:
            out.setdefault(cls, None)
        return out

    def base_class(self, model_type: str) -> str:
        return stock_heads(model_type)["AutoModel"]

    # --- modules of a model -------------------------------------------------------------------------
    def block_list(self, model: nn.Module) -> list[nn.Module]:
        return list(get_path(model.base_model, self.blocks))

    def projections(self, block: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        return [get_path(block, p) for p in self.inputs], get_path(block, self.output)

    def act(self, block: nn.Module):
        """The activation module of the block (a fused layer's includes its count vector)."""
        return get_path(block, self.activation)

    def set_act(self, block: nn.Module, module) -> None:
        set_path(block, self.activation, module)

    def residual_input(self, block: nn.Module) -> nn.Module | None:
        return get_path(block, self.residual) if self.residual else None

    # --- weights --------------------------------------------------------------------------------------
    def read(self, block: nn.Module) -> MLPTensors:
        """The block's MLP in canonical orientation, as a batch of one (views of the module weights)."""
        ins, out = self.projections(block)
        return MLPTensors(tuple(_canonical(m).unsqueeze(0) for m in ins),
                          tuple(None if m.bias is None else m.bias.unsqueeze(0) for m in ins),
                          _canonical(out).unsqueeze(0), self.kind)

    def output_bias(self, block: nn.Module) -> torch.Tensor | None:
        return self.projections(block)[1].bias

    def write(self, block: nn.Module, mlp: MLPTensors) -> None:
        """Overwrite the block's projections in place with `mlp` (batch of one, same widths)."""
        ins, out = self.projections(block)
        with torch.no_grad():
            for module, w, b in zip(ins, mlp.ins, mlp.in_biases):
                module.weight.copy_(_stored(module, w[0]))
                if b is not None:
                    module.bias.copy_(b[0])
            out.weight.copy_(_stored(out, mlp.out[0]))

    def write_output(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Overwrite the output projection in place: `weight` canonical [d, k], `bias` [d] or None."""
        _, out = self.projections(block)
        with torch.no_grad():
            out.weight.copy_(_stored(out, weight.to(out.weight.dtype)))
            if bias is not None:
                out.bias.copy_(bias.to(out.bias.dtype))

    def state_entries(self, block_name: str, block: nn.Module, mlp: MLPTensors, counts: torch.Tensor | None,
                      out_bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """State-dict entries of a new MLP for the block named `block_name` (batch of one, canonical)."""
        ins, out = self.projections(block)
        entries = {}
        for path, module, w, b in zip(self.inputs, ins, mlp.ins, mlp.in_biases):
            entries[f"{block_name}.{path}.weight"] = _stored(module, w[0])
            if b is not None:
                entries[f"{block_name}.{path}.bias"] = b[0].contiguous()
        entries[f"{block_name}.{self.output}.weight"] = _stored(out, mlp.out[0])
        if out_bias is not None:
            entries[f"{block_name}.{self.output}.bias"] = out_bias.detach().clone()
        if counts is not None:
            entries[f"{block_name}.{self.activation}.counts"] = counts.contiguous()
        return entries


def _canonical(module: nn.Module) -> torch.Tensor:
    """A projection's weight as nn.Linear stores it ([out, in]); Conv1D keeps its transpose."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _stored(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return (w.t() if isinstance(module, Conv1D) else w).contiguous()
