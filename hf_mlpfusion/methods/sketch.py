"""Gaussian sketch: S [p, k] with N(0, 1/k) entries (one per layer, seeded).

Every input projection (and its bias) becomes S^T W, the output projection W_out S. E[S S^T] = I,
so the linearised MLP is kept on average.
"""

from __future__ import annotations

import math

import torch

from ..core.mlp import MLPTensors
from . import Reduction, register_method


def reduce(mlps: MLPTensors, k: int, *, seed: int = 0, **extra) -> Reduction:
    B, p = mlps.batch, mlps.width
    gen = torch.Generator().manual_seed(int(seed))
    S = (torch.randn(B, p, k, generator=gen, dtype=torch.float64) / math.sqrt(k)).to(mlps.out.device)
    St = S.transpose(-1, -2)
    ins = tuple((St @ w.double()).to(w.dtype) for w in mlps.ins)
    biases = tuple(None if b is None else (St @ b.double().unsqueeze(-1)).squeeze(-1).to(b.dtype)
                   for b in mlps.in_biases)
    out = (mlps.out.double() @ S).to(mlps.out.dtype)
    return Reduction(MLPTensors(ins, biases, out, mlps.kind))


register_method("sketch", reduce, description="Gaussian sketch of the intermediate dimension")
