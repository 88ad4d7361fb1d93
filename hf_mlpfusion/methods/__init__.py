"""The reduction methods, one file each: MLP fusion (the paper's) and its baselines.

Every method is a function `reduce(mlps, k, *, seed, device, kmeans_options, metric=None)` over a
batch of MLPs of one shape (`core.mlp.MLPTensors`) that returns a `Reduction`: the narrower MLPs and,
for fusion, the frozen count vector. Methods register themselves here with `register_method`; the
rest of the package only looks them up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.mlp import MLPTensors, sub_mlp_vectors


@dataclass
class Reduction:
    """B narrower MLPs (width k), with what the method knows about how they were made."""

    mlps: MLPTensors
    counts: torch.Tensor | None = None  # [B, k] frozen scale after the activation, or None
    inertia: torch.Tensor | None = None  # [B] float64 k-means inertia, for clustering methods
    labels: torch.Tensor | None = None  # [B, p] old neuron -> new neuron, for clustering methods


@dataclass(frozen=True)
class Method:
    name: str
    reduce: Callable[..., Reduction]
    data_aware: bool = False  # whether its clustering can use a data metric
    description: str = ""  # one line for the model card
    # whether `reduce` takes the MLPs in the weights' own dtype (and computes in float32 itself, exactly
    # as on float32 copies): then `fuse.reduce_layers` does not make a float32 copy of every layer first
    any_dtype: bool = False
    # optional: the same reduction without a data metric from the sub-MLP vectors,
    # `reduce_vectors(z, like, k, *, seed, device, kmeans_options)` with `z, like = vector_input(mlps)`,
    # so that a caller can free the weights before the clustering
    reduce_vectors: Callable[..., Reduction] | None = None
    counts: bool = False  # whether its Reduction has a count vector (what fold_scale folds)


METHODS: dict[str, Method] = {}


def vector_input(mlps: MLPTensors) -> tuple[torch.Tensor, MLPTensors]:
    """What `Method.reduce_vectors` takes for `mlps`: the float32 sub-MLP vectors and a weightless template."""
    return sub_mlp_vectors(mlps, torch.float32), mlps.template()


def register_method(name: str, reduce: Callable[..., Reduction], *, data_aware: bool = False,
                    description: str = "", any_dtype: bool = False,
                    reduce_vectors: Callable[..., Reduction] | None = None, counts: bool = False) -> None:
    METHODS[name] = Method(name, reduce, data_aware, description, any_dtype, reduce_vectors, counts)


from . import cluster, fusion, prune, sketch  # noqa: E402,F401  (each registers itself)

DATA_AWARE_METHODS = tuple(name for name, m in METHODS.items() if m.data_aware)

__all__ = ["DATA_AWARE_METHODS", "METHODS", "Method", "Reduction", "register_method", "vector_input"]
