"""Inputs and outputs of tiny models: torch only, so a subprocess without hf_mlpfusion can use them."""

from __future__ import annotations

import torch

VOCAB = 100


def inputs(head: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if head.endswith("ForMultipleChoice"):
        return {"input_ids": ids.unsqueeze(1).expand(batch, 3, length).contiguous()}
    if head.endswith("DoubleHeadsModel"):
        return {"input_ids": ids.unsqueeze(1).expand(batch, 2, length).contiguous(),
                "mc_token_ids": torch.full((batch, 2), length - 1)}
    return {"input_ids": ids}


def outputs(m, head: str) -> list[torch.Tensor]:
    """Every tensor the forward pass returns (caches left out)."""
    with torch.no_grad():
        out = m(**inputs(head))
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a, (len(a), len(b))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
