"""The math on MLPs, batched over layers: sub-MLP vectors -> a narrower MLP (+ frozen counts).

A transformer MLP f(x) = W2 act(W1 x + b1) + b2 with p neurons is a sum of p one-neuron sub-MLPs
with vectors z_i = [W1[i, :], b1[i], W2[:, i]] (length 2d + 1). Fusion clusters the z_i into k
centroids C; the fused MLP is W1' = C[:, :d], b1' = C[:, d], W2' = C[:, d+1:]^T with the cluster
sizes n applied after the activation: f'(x) = W2' (n * act(W1' x + b1')) + b2.

Pure tensors in and out: this module never imports transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .core.kmeans import cluster_means, kmeans


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


@dataclass
class DataMetric:
    """Statistics of B layers' MLP inputs that make k-means measure what merging neurons costs on data.

    Merging neuron i into a centre c changes the MLP output, to first order, by
    W2_i act'(a_i) (a_c - a_i) + (W2_c - W2_i) act(a_c), with a = W1 x + b1 the pre-activation.
    Its expected square on the inputs x is approximated by a Euclidean distance between the vectors
    u_i = [s1 * L^T [W1_i, b1_i], s2 * W2_i]:

    - L: the Cholesky factor of E[[x, 1] [x, 1]^T], so ||L^T v||^2 = E[(v . [x, 1])^2] is the mean
      squared change of the pre-activation on the real inputs;
    - s1^2 = mean_i ||W2_i||^2 E[act'(a_i)^2] and s2^2 = mean_i E[act(a_i)^2], averaged over the
      neurons, so that one plain (unweighted) k-means still applies.

    The centres are then the plain means of the members' original vectors (the map is linear, so
    this is the centre in either space), and the counts are the cluster sizes as before.
    """

    chol: torch.Tensor  # [B, d + 1, d + 1] lower-triangular L with L L^T = E[[x, 1][x, 1]^T]
    w1_scale: torch.Tensor  # [B] s1
    w2_scale: torch.Tensor  # [B] s2
    tokens: int = 0  # how many tokens the statistics were taken on


def metric_vectors(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, metric: DataMetric) -> torch.Tensor:
    """The sub-MLP vectors in the data metric's space: [B, p, 2d + 1] (see `DataMetric`)."""
    L = metric.chol.to(device=w1.device, dtype=torch.float64)
    w1b = torch.cat([w1, b1.unsqueeze(-1)], dim=-1).double()  # [B, p, d + 1]
    s1 = metric.w1_scale.to(device=w1.device, dtype=torch.float64)[:, None, None]
    s2 = metric.w2_scale.to(device=w1.device, dtype=torch.float64)[:, None, None]
    return torch.cat([(w1b @ L) * s1, w2.transpose(-1, -2).double() * s2], dim=-1).float()


def fuse_mlps(w1, b1, w2, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None,
              metric: DataMetric | None = None, **extra) -> ReducedMLPs:
    """The paper's MLP fusion: k-means on the sub-MLP vectors of every layer in one batched call.

    With `metric` (data-aware clustering), k-means runs on the vectors mapped by the data metric and
    the centres are the means of the members' original vectors; without it, the paper's data-free
    clustering of the raw vectors.
    """
    d = w1.shape[-1]
    z = sub_mlp_vectors(w1, b1, w2).float()
    opts = {key: v for key, v in (kmeans_options or {}).items() if v is not None}
    if metric is None:
        res = kmeans(z, k, seed=seed, device=device, **opts)
        centers = res.centers.to(device=w1.device, dtype=torch.float32)
    else:
        res = kmeans(metric_vectors(w1, b1, w2, metric), k, seed=seed, device=device, **opts)
        centers = cluster_means(z, res.labels.to(z.device), k).float()
    labels = res.labels.to(w1.device)
    nw1, nb1, nw2 = split_vectors(centers, d)
    return ReducedMLPs(nw1, nb1, nw2, cluster_sizes(labels, k).float(), res.inertia.cpu().double(), labels)


def fold_counts(mlps: ReducedMLPs) -> ReducedMLPs:
    """Fold the count vector into the columns of W2' (exact for inference): W2' diag(n)."""
    if mlps.counts is None:
        return mlps
    w2 = mlps.w2 * mlps.counts.unsqueeze(-2).to(mlps.w2.dtype)
    return ReducedMLPs(mlps.w1, mlps.b1, w2, None, mlps.inertia, mlps.labels)


# --- the paper's baselines (same signature, same kind of result; counts=None: a plain MLP) ------


def cluster_mlps(w1, b1, w2, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None,
                 metric: DataMetric | None = None, **extra) -> ReducedMLPs:
    """The reference code's `cluster` baseline: the same k-means, with sqrt(n) folded into W1, b1 and W2.

    W1' = sqrt(n) C_W1, b1' = sqrt(n) c_b1, W2' = sqrt(n) C_W2. Exact for ReLU (positively
    homogeneous), not for GELU; no count vector is kept.
    """
    fused = fuse_mlps(w1, b1, w2, k, seed=seed, device=device, kmeans_options=kmeans_options, metric=metric)
    s = fused.counts.sqrt().to(fused.w1.dtype)  # [B, k]
    return ReducedMLPs(fused.w1 * s.unsqueeze(-1), fused.b1 * s, fused.w2 * s.unsqueeze(-2), None,
                       fused.inertia, fused.labels)


def neuron_scores(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Magnitude of each neuron's sub-MLP: ||W1[i, :]|| * ||W2[:, i]||, shape [B, p]."""
    return w1.float().norm(dim=-1) * w2.float().norm(dim=-2)


def prune_mlps(w1, b1, w2, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None,
               **extra) -> ReducedMLPs:
    """Magnitude pruning: keep the k neurons with the largest ||W1[i]|| * ||W2[:, i]|| (kept in order)."""
    scores = neuron_scores(w1, w2)
    # stable: ties broken by the lower index, so the result does not depend on the sort's backend
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    keep = torch.sort(order, dim=-1).values  # [B, k], original neuron order
    nw1 = torch.gather(w1, 1, keep.unsqueeze(-1).expand(-1, -1, w1.shape[-1]))
    nb1 = torch.gather(b1, 1, keep)
    nw2 = torch.gather(w2, 2, keep.unsqueeze(1).expand(-1, w2.shape[1], -1))
    return ReducedMLPs(nw1.contiguous(), nb1.contiguous(), nw2.contiguous(), None)


def sketch_mlps(w1, b1, w2, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None,
                **extra) -> ReducedMLPs:
    """Gaussian sketch: S [p, k] with N(0, 1/k) entries (one per layer, seeded);
    W1' = S^T W1, b1' = S^T b1, W2' = W2 S. E[S S^T] = I, so the linearised MLP is kept on average."""
    B, p, _ = w1.shape
    gen = torch.Generator().manual_seed(int(seed))
    S = (torch.randn(B, p, k, generator=gen, dtype=torch.float64) / math.sqrt(k)).to(w1.device)
    nw1 = (S.transpose(-1, -2) @ w1.double()).to(w1.dtype)
    nb1 = (S.transpose(-1, -2) @ b1.double().unsqueeze(-1)).squeeze(-1).to(b1.dtype)
    nw2 = (w2.double() @ S).to(w2.dtype)
    return ReducedMLPs(nw1, nb1, nw2, None)


# method name -> function(w1, b1, w2, k, *, seed, device, kmeans_options, **extra) -> ReducedMLPs
# (the clustering methods also take `metric`, a DataMetric, for data-aware clustering)
METHODS: dict[str, Callable[..., ReducedMLPs]] = {
    "fusion": fuse_mlps,
    "cluster": cluster_mlps,
    "prune": prune_mlps,
    "sketch": sketch_mlps,
}
DATA_AWARE_METHODS = ("fusion", "cluster")  # the methods whose clustering can use a DataMetric
