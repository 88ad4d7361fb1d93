"""MLP fusion (the paper's method): k-means on the sub-MLP vectors, centroids + frozen counts.

The centroids C of the p sub-MLP vectors give the fused projections (split back into the MLP's
parts); the cluster sizes n are the count vector applied after the activation (after the gated
product for gated MLPs) and before the output projection:

    f'(x) = W2' (n * act(W1' x + b1')) + b2        or        W_down' (n * act(W_gate' x) * (W_up' x))

With a data metric (data-aware clustering), k-means runs on the vectors mapped by the metric and
the centres are the means of the members' original vectors.
"""

from __future__ import annotations

import torch

from ..core.kmeans import cluster_means, kmeans
from ..core.metric import DataMetric, metric_vectors
from ..core.mlp import MLPTensors, cluster_sizes, split_vectors
from . import Reduction, register_method, vector_input


def reduce(mlps: MLPTensors, k: int, *, seed: int = 0, device="auto", kmeans_options: dict | None = None,
           metric: DataMetric | None = None, **extra) -> Reduction:
    z, like = vector_input(mlps)  # the layers may come in their own dtype (any_dtype below)
    if metric is None:
        return reduce_vectors(z, like, k, seed=seed, device=device, kmeans_options=kmeans_options)
    res = kmeans(metric_vectors(mlps, metric), k, seed=seed, device=device, **_options(kmeans_options))
    centers = cluster_means(z, res.labels.to(z.device), k).float()
    return _reduction(centers, like, res)


def reduce_vectors(z: torch.Tensor, like: MLPTensors, k: int, *, seed: int = 0, device="auto",
                   kmeans_options: dict | None = None, **extra) -> Reduction:
    """`reduce` without a data metric, from `z, like = vector_input(mlps)` (the float32 sub-MLP vectors and a
    weightless template): the caller may free the weights before the clustering."""
    res = kmeans(z, k, seed=seed, device=device, **_options(kmeans_options))
    return _reduction(res.centers.to(device=z.device, dtype=torch.float32), like, res)


def _options(kmeans_options: dict | None) -> dict:
    return {key: v for key, v in (kmeans_options or {}).items() if v is not None}


def _reduction(centers: torch.Tensor, like: MLPTensors, res) -> Reduction:
    """The fused MLPs from the k-means result: centroids split into the MLP's parts, cluster sizes as counts."""
    labels = res.labels.to(centers.device)
    k = centers.shape[-2]
    return Reduction(split_vectors(centers, like), cluster_sizes(labels, k).float(), res.inertia.cpu().double(), labels)


register_method("fusion", reduce, data_aware=True, any_dtype=True, reduce_vectors=reduce_vectors, counts=True,
                description="MLP fusion: k-means clustering of the sub-MLPs, centroids with a frozen count vector")
