"""Magnitude pruning: keep the k neurons whose weights are largest, in their original order.

A neuron's score is the product of the norms of all its weights: ||W1[i]|| * ||W2[:, i]|| for a
linear pair, ||W_gate[i]|| * ||W_up[i]|| * ||W_down[:, i]|| for a gated MLP.
"""

from __future__ import annotations

import torch

from ..core.mlp import MLPTensors
from . import Reduction, register_method


def neuron_scores(mlps: MLPTensors) -> torch.Tensor:
    """[B, p]: the product of the norms of each neuron's rows and column."""
    score = None
    for n in mlps.neuron_norms():
        score = n if score is None else score * n
    return score


def reduce(mlps: MLPTensors, k: int, **extra) -> Reduction:
    scores = neuron_scores(mlps)
    # stable: ties broken by the lower index, so the result does not depend on the sort's backend
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    keep = torch.sort(order, dim=-1).values  # [B, k], original neuron order
    kept = mlps.select(keep)
    return Reduction(kept.map(lambda t: t.contiguous()))


register_method("prune", reduce, description="magnitude pruning: the neurons with the largest weight norms are kept")
