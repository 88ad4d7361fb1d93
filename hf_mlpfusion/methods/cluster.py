"""The reference code's `cluster` baseline: the same k-means, with sqrt(n) folded into the weights.

The first input projection (W1 and b1, or W_gate) and the output projection are scaled by the
square root of each cluster's size, and no count vector is kept. For a linear pair this is the
reference code's W1' = sqrt(n) C_W1, b1' = sqrt(n) c_b1, W2' = sqrt(n) C_W2: exact for positively
homogeneous activations (ReLU), not for GELU or SiLU.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..core.metric import DataMetric
from ..core.mlp import MLPTensors, scale_output
from . import Reduction, fusion, register_method


def reduce(mlps: MLPTensors, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None,
           metric: DataMetric | None = None, **extra) -> Reduction:
    return _fold_sqrt_counts(fusion.reduce(mlps, k, seed=seed, device=device, kmeans_options=kmeans_options,
                                           metric=metric))


def reduce_vectors(z: torch.Tensor, like: MLPTensors, k: int, *, seed: int = 0, device="auto",
                   kmeans_options: dict | None = None, **extra) -> Reduction:
    """`reduce` without a data metric, from the sub-MLP vectors (see `fusion.reduce_vectors`)."""
    return _fold_sqrt_counts(fusion.reduce_vectors(z, like, k, seed=seed, device=device, kmeans_options=kmeans_options))


def _fold_sqrt_counts(fused: Reduction) -> Reduction:
    s = fused.counts.sqrt().to(fused.mlps.out.dtype)  # [B, k]
    m = fused.mlps
    first = m.ins[0] * s.unsqueeze(-1)
    bias = m.in_biases[0] * s if m.in_biases[0] is not None else None
    m = replace(m, ins=(first, *m.ins[1:]), in_biases=(bias, *m.in_biases[1:]))
    return Reduction(scale_output(m, s), None, fused.inertia, fused.labels)


register_method("cluster", reduce, data_aware=True, any_dtype=True, reduce_vectors=reduce_vectors,
                description="k-means clustering of the sub-MLPs with sqrt(cluster size) folded into the weights "
                            "(the reference code's `cluster` baseline)")
