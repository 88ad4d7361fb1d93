"""A data metric for k-means: distances that approximate what merging two neurons costs on real inputs.

Merging neuron i into a centre c changes the MLP's output, to first order, by

    sum_j  W_out[:, i] (dh_i/da_ij) (a_cj - a_ij)  +  (W_out[:, c] - W_out[:, i]) h_c

where a_ij = W_j[i] . x (+ b_j[i]) is the neuron's pre-activation in input projection j and h its
hidden feature (act(a_1) for a linear pair, act(a_gate) * a_up for a gated MLP). Its expected
square on the inputs x is approximated by a Euclidean distance between the vectors

    u_i = [s_1 L^T [W_1[i], b_1[i]], ..., s_m L^T [W_m[i], b_m[i]], s_out W_out[:, i]]

- L: the Cholesky factor of E[x~ x~^T], x~ = [x, 1] when the projections have biases, else x, so
  ||L^T v||^2 = E[(v . x~)^2] is the mean squared change of a pre-activation on the real inputs;
- s_j^2 = mean_i ||W_out[:, i]||^2 E[(dh_i/da_ij)^2] and s_out^2 = mean_i E[h_i^2], averaged over
  the neurons so that one plain (unweighted) k-means still applies.

The centres are then the plain means of the members' original vectors (the map is linear, so this
is the centre in either space), and the counts are the cluster sizes as before.

Pure tensors: this module never imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mlp import MLPTensors, hidden


MAX_JITTER_STEPS = 12


@dataclass
class DataMetric:
    """The statistics of B layers' MLP inputs that define the metric (see the module docstring)."""

    chol: torch.Tensor  # [B, e, e] lower-triangular L with L L^T = E[x~ x~^T] (e = d + 1 with biases, else d)
    in_scales: torch.Tensor  # [B, m] s_j, one per input projection
    out_scale: torch.Tensor  # [B] s_out
    # (one layer's metric, from `MetricStats.metric`, has no batch dimension: [e, e], [m], [])
    tokens: int = 0  # how many tokens the statistics were taken on


def stack_metrics(metrics: list[DataMetric]) -> DataMetric:
    """The metrics of single layers (unbatched, as `MetricStats.metric` gives them) as one batch."""
    return DataMetric(torch.stack([m.chol for m in metrics]), torch.stack([m.in_scales for m in metrics]),
                      torch.stack([m.out_scale.reshape(()) for m in metrics]), max(m.tokens for m in metrics))


def metric_vectors(mlps: MLPTensors, metric: DataMetric) -> torch.Tensor:
    """The sub-MLP vectors in the data metric's space: [B, p, D'] float32 (see the module docstring).

    Each part is computed in float64 and rounded into its columns of the result, so only one part's
    float64 products exist at a time (not all of them and their concatenation)."""
    dev = mlps.out.device
    L = metric.chol.to(device=dev, dtype=torch.float64)
    B, p = mlps.out.shape[0], mlps.out.shape[-1]
    widths = [w.shape[-1] + int(b is not None) for w, b in zip(mlps.ins, mlps.in_biases)] + [mlps.out.shape[-2]]
    out = torch.empty(B, p, sum(widths), dtype=torch.float32, device=dev)
    c = 0
    for j, (w, b) in enumerate(zip(mlps.ins, mlps.in_biases)):
        rows = w.double() if b is None else torch.cat([w.double(), b.double().unsqueeze(-1)], dim=-1)
        s = metric.in_scales[:, j].to(device=dev, dtype=torch.float64)[:, None, None]
        part = rows @ L
        del rows
        out[..., c : c + widths[j]] = part.mul_(s)
        c += widths[j]
        del part
    s_out = metric.out_scale.to(device=dev, dtype=torch.float64)[:, None, None]
    out[..., c:] = mlps.out.transpose(-1, -2).double().mul_(s_out)
    return out


class MetricStats:
    """Running sums over tokens for ONE MLP (batch of 1): E[x~ x~^T], E[h^2] and E[(dh/da_j)^2] per neuron."""

    def __init__(self, mlp: MLPTensors, act):
        self.mlp = mlp.map(lambda t: t.detach())
        self.act = act
        self.biased = any(b is not None for b in mlp.in_biases)
        d, p = mlp.hidden_size, mlp.width
        e = d + int(self.biased)
        self.device = dev = mlp.out.device  # the sums live where the MLP is
        self.xx = torch.zeros(e, e, dtype=torch.float64, device=dev)
        self.h2 = torch.zeros(p, dtype=torch.float64, device=dev)
        self.grad2 = torch.zeros(len(mlp.ins), p, dtype=torch.float64, device=dev)
        self.out_norm2 = self.mlp.out[0].double().pow(2).sum(0)  # ||W_out[:, i]||^2
        self.n = 0

    def add(self, x: torch.Tensor, pre: list[torch.Tensor] | None = None) -> None:
        """Add the statistics of x [N, d] (float32, moved to where the MLP is); `pre`: the input projections'
        outputs at x when the caller has them already (one [N, p] per input), else computed here."""
        # float32 products of one batch, summed over batches in float64: a batch holds a few hundred
        # to a few thousand tokens, where float32 sums keep ~1e-6 relative accuracy
        x = x.to(self.device)
        xa = x.float()
        if self.biased:
            xa = torch.cat([xa, torch.ones(x.shape[0], 1, dtype=xa.dtype, device=xa.device)], dim=1)
        self.xx += (xa.T @ xa).double()
        w0 = self.mlp.ins[0]
        if pre is None:
            pre = [torch.nn.functional.linear(x.to(w0), w[0], None if b is None else b[0]) for w, b in
                   zip(self.mlp.ins, self.mlp.in_biases)]
        pre = [a.detach().float().to(self.device) for a in pre]
        with torch.enable_grad():
            pre = [a.requires_grad_(True) for a in pre]
            h = hidden(self.mlp.kind, self.act, pre)
            grads = torch.autograd.grad(h.sum(), pre)  # h_i depends on neuron i's own pre-activations only
        self.h2 += h.detach().pow(2).sum(0, dtype=torch.float64)
        for j, g in enumerate(grads):
            self.grad2[j] += g.pow(2).sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    def metric(self) -> DataMetric:
        n = max(self.n, 1)
        S = self.xx / n
        eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        jitter = 1e-6 * float(S.diagonal().mean().clamp_min(1e-30))
        # inputs confined to a subspace (fewer tokens than features, a norm that removes a direction) make
        # S singular, and its rounding can leave an eigenvalue below -jitter: add ten times more until it
        # factors (deterministic: the same S always takes the same steps)
        for _ in range(MAX_JITTER_STEPS):
            L, info = torch.linalg.cholesky_ex(S + eye * jitter)
            if int(info) == 0:
                break
            jitter *= 10
        else:
            raise ValueError("the MLP inputs' covariance is not finite: the calibration text gives NaN or inf activations")
        s_in = (self.out_norm2[None] * self.grad2 / n).mean(-1).sqrt()  # [m]
        s_out = (self.h2 / n).mean().sqrt()
        return DataMetric(L, s_in, s_out, tokens=self.n)
