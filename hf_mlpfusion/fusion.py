"""The math on MLPs, batched over layers: sub-MLP vectors -> a narrower MLP (+ frozen counts).

A transformer MLP f(x) = W2 act(W1 x + b1) + b2 with p neurons is a sum of p one-neuron sub-MLPs
with vectors z_i = [W1[i, :], b1[i], W2[:, i]] (length 2d + 1). Fusion clusters the z_i into k
centroids C; the fused MLP is W1' = C[:, :d], b1' = C[:, d], W2' = C[:, d+1:]^T with the cluster
sizes n applied after the activation: f'(x) = W2' (n * act(W1' x + b1')) + b2.

Pure tensors in and out: this module never imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .kmeans import kmeans


@dataclass
class ReducedMLPs:
    """A batch of B narrower MLPs (canonical nn.Linear orientation)."""

    w1: torch.Tensor  # [B, k, d]
    b1: torch.Tensor  # [B, k]
    w2: torch.Tensor  # [B, d, k]
    counts: torch.Tensor | None  # [B, k] frozen scale applied after the activation, or None
    inertia: torch.Tensor | None = None  # [B] float64 k-means inertia, when clustering was used
    labels: torch.Tensor | None = None  # [B, p] neuron -> new neuron, when it is a clustering


def sub_mlp_vectors(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """[B, p, d], [B, p], [B, d, p] -> z of shape [B, p, 2d + 1] (= [W1 row, b1, W2 column])."""
    return torch.cat([w1, b1.unsqueeze(-1), w2.transpose(-1, -2)], dim=-1)


def split_vectors(z: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `sub_mlp_vectors`: [B, k, 2d + 1] -> W1' [B, k, d], b1' [B, k], W2' [B, d, k]."""
    return z[..., :d], z[..., d], z[..., d + 1 :].transpose(-1, -2)


def cluster_sizes(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B, p] int labels -> [B, k] float cluster sizes."""
    counts = torch.zeros(labels.shape[0], k, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    return counts


def fuse_mlps(w1, b1, w2, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None) -> ReducedMLPs:
    """The paper's MLP fusion: k-means on the sub-MLP vectors of every layer in one batched call."""
    d = w1.shape[-1]
    z = sub_mlp_vectors(w1, b1, w2).float()
    opts = {key: v for key, v in (kmeans_options or {}).items() if v is not None}
    res = kmeans(z, k, seed=seed, device=device, **opts)
    centers = res.centers.to(device=w1.device, dtype=torch.float32)
    labels = res.labels.to(w1.device)
    nw1, nb1, nw2 = split_vectors(centers, d)
    return ReducedMLPs(nw1, nb1, nw2, cluster_sizes(labels, k).float(), res.inertia.cpu().double(), labels)


def fold_counts(mlps: ReducedMLPs) -> ReducedMLPs:
    """Fold the count vector into the columns of W2' (exact for inference): W2' diag(n)."""
    if mlps.counts is None:
        return mlps
    w2 = mlps.w2 * mlps.counts.unsqueeze(-2).to(mlps.w2.dtype)
    return ReducedMLPs(mlps.w1, mlps.b1, w2, None, mlps.inertia, mlps.labels)


# method name -> function(w1, b1, w2, k, *, seed, device, kmeans_options) -> ReducedMLPs
METHODS: dict[str, Callable[..., ReducedMLPs]] = {"fusion": fuse_mlps}
