"""Per-layer width allocation under one budget: spend the width where it costs the least fidelity.

`--ratio` (or `--intermediate-size`) stays the budget for the fused layers as a whole: the sum of
their widths is at most what one width for all of them would give. Within it, `allocate` measures
how much each layer loses at a few candidate widths and picks the widths that lose the least in all:

1. every fused layer is reduced (clustered, pruned, ...) at each candidate width, a multiple of the
   uniform width (x0.5, x0.75, x1, x1.5, x2 by default), rounded to `width_multiple`;
2. the original model runs one block at a time on the calibration text (`propagate`); at each fused
   layer, the MLP's inputs x and the residual stream r give, for every candidate, the error left
   after the least-squares refit that calibration will do: sum_t w_t ||f'(x_t) - f(x_t)||^2 / N,
   with the token weights w_t of calibration (1 / the feature variance of the residual sum r + f(x),
   what the next LayerNorm divides by), so the errors of all layers are in the same units;
3. an exact multiple-choice knapsack (dynamic programming over the total width) picks one candidate
   per layer with the least summed error whose widths fit the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import FusionConfig, round_width
from .core.mlp import hidden
from .errors import InvalidConfigError
from .families import family_of
from .methods import Reduction

DEFAULT_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class Allocation:
    widths: dict[int, int]  # layer -> chosen width
    budget: int  # the total width allowed (what uniform widths would use)
    errors: dict[int, dict[int, float]]  # layer -> {candidate width: error after refit}
    uniform: dict[int, int]  # layer -> the uniform width
    reductions: dict[tuple[int, int], Reduction] = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return sum(self.widths.values())

    def summary(self) -> dict:
        """JSON-able record for the checkpoint's metadata."""
        return {
            "budget": self.budget,
            "total": self.total,
            "widths": {str(i): w for i, w in sorted(self.widths.items())},
            "error": sum(self.errors[i][w] for i, w in self.widths.items()),
            "error_uniform": sum(self.errors[i][w] for i, w in self.uniform.items()),
            "candidates": {str(i): {str(w): e for w, e in sorted(errs.items())} for i, errs in sorted(self.errors.items())},
        }


def candidate_widths(p: int, k: int, multiple: int, factors=DEFAULT_FACTORS) -> list[int]:
    """Candidate widths of a layer of p neurons whose uniform width is k (always including k)."""
    out = {k}
    for f in factors:
        out.add(round_width(max(1, int(math.floor(f * k + 0.5))), p, multiple))
    return sorted(w for w in out if 1 <= w <= p)


def choose(errors: dict[int, dict[int, float]], budget: int) -> dict[int, int]:
    """One width per layer, least summed error, total width <= budget (exact, dynamic programming)."""
    layers = sorted(errors)
    widths = [w for i in layers for w in errors[i]] + [budget]
    unit = math.gcd(*widths) or 1
    cap = budget // unit
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[b]: least error of the layers so far using exactly b units
    picks: list[list[int | None]] = []
    for i in layers:
        new = [inf] * (cap + 1)
        pick: list[int | None] = [None] * (cap + 1)
        for w, e in sorted(errors[i].items()):
            u = w // unit
            for b in range(u, cap + 1):
                if best[b - u] + e < new[b]:
                    new[b] = best[b - u] + e
                    pick[b] = w
        best = new
        picks.append(pick)
    end = min(range(cap + 1), key=lambda b: (best[b], -b))
    if best[end] == inf:
        raise InvalidConfigError("no combination of candidate widths fits the budget: raise the ratio")
    out = {}
    for i, pick in zip(reversed(layers), reversed(picks)):
        w = pick[end]
        out[i] = w
        end -= w // (unit)
    return dict(sorted(out.items()))


def _refit_error(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, has_bias: bool, ridge: float) -> tuple:
    """Normal-equation pieces of the weighted least squares of y on [h, 1]."""
    if has_bias:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)
    hw = h * w[:, None]
    return hw.T @ h, hw.T @ y, float((w[:, None] * y.pow(2)).sum())


def allocate(model, config: FusionConfig, texts: list[str], tokenizer, *, metrics=None, factors=DEFAULT_FACTORS,
             max_length: int = 128, batch_size: int = 16, ridge: float = 1e-6,
             progress: Callable[[str], None] | None = None, device=None) -> Allocation:
    """Choose the fused width of every layer `config` fuses, under its budget (see the module docstring).
    `device`: where the blocks run and the errors are measured (None: where the model is)."""
    from .calibrate import batches, float32, mlp_points, mlp_stop
    from .fuse import reduce_layers
    from .propagate import compute_device, on_device, run_block, trace

    say = progress or (lambda msg: None)
    family = family_of(model)
    blocks = family.block_list(model)
    layers = config.resolve_layers(family.num_layers(model.config))
    mlps = {i: family.read(blocks[i]) for i in layers}
    uniform, budget, cands = plan_candidates(config, {i: m.width for i, m in mlps.items()}, factors)

    say(f"reducing {len(layers)} layer(s) at {len({w for c in cands.values() for w in c})} candidate widths")
    reductions: dict[tuple[int, int], Reduction] = {}
    for w in sorted({w for c in cands.values() for w in c}):
        chosen = [i for i in layers if w in cands[i]]
        red = reduce_layers({i: mlps[i] for i in chosen}, {i: w for i in chosen}, config, metrics)
        reductions.update({(i, w): red[i] for i in chosen})

    errors: dict[int, dict[int, float]] = {i: {} for i in layers}
    encoded = list(batches(texts, tokenizer, max_length=max_length, batch_size=batch_size, model=model, by_length=True))
    was = model.training
    model.eval()
    try:
        with float32(model):
            dev = compute_device(model, device)
            tr = trace(model, family, encoded).to(dev)
            h_cur = tr.hidden
            for i in range(max(layers) + 1):
                with on_device(blocks[i], dev):
                    if i not in errors:
                        h_cur, _ = run_block(blocks[i], tr, i, h_cur)
                        continue
                    say(f"measuring layer {i} at {len(cands[i])} widths")
                    h_cur, got = run_block(blocks[i], tr, i, h_cur, capture=mlp_points(family, blocks[i]),
                                           stop=mlp_stop(family, blocks[i]) if i == max(layers) else None)
                    errors[i] = layer_errors(family, blocks[i], got, {w: reductions[(i, w)] for w in cands[i]}, ridge)
    finally:
        model.train(was)
    widths = choose(errors, budget)
    return Allocation(widths, budget, errors, uniform, reductions)


def plan_candidates(config: FusionConfig, widths: dict[int, int], factors=DEFAULT_FACTORS):
    """(layer -> uniform width, the budget, layer -> candidate widths) for layers of `widths` neurons."""
    uniform = {i: FusionConfig.width_for(_without_widths(config), p, i) for i, p in widths.items()}
    cands = {i: candidate_widths(widths[i], uniform[i], config.width_multiple, factors) for i in widths}
    return uniform, sum(uniform.values()), cands


def layer_errors(family, block, got: dict[str, torch.Tensor], candidates: dict[int, Reduction],
                 ridge: float) -> dict[int, float]:
    """Width -> the error each candidate reduction of `block`'s MLP leaves after the refit, on what
    `run_block` captured of the original block ("x", "r"; see the module docstring, step 2)."""
    from .calibrate import mlp_apply, solve_normal, token_weights

    x, r = got["x"], got.get("r", got["x"])
    with torch.no_grad():
        y = mlp_apply(family, block, x).double()
        wt = token_weights((y + r.double()).float()).double()
    act = _plain_act(family.act(block))
    has_bias = family.output_bias(block) is not None
    n = x.shape[0]
    out = {}
    for w, red in candidates.items():
        m = red.mlps.map(lambda t: t.to(x.device, torch.float64))  # the reductions may sit elsewhere
        with torch.no_grad():
            pre = [x.double() @ wi[0].T + (0 if b is None else b[0]) for wi, b in zip(m.ins, m.in_biases)]
            h = hidden(m.kind, act, pre)
            if red.counts is not None:
                h = h * red.counts.to(x.device, torch.float64)
        A, B, yy = _refit_error(h, y, wt, has_bias, ridge)
        lam = ridge * float(A.diagonal().mean().clamp_min(1e-30))
        reg = torch.eye(A.shape[0], dtype=A.dtype, device=A.device) * lam
        if has_bias:
            reg[-1, -1] = 0.0
        W = solve_normal(A + reg, B)
        err = float((W * (A @ W)).sum() - 2 * (W * B).sum() + yy)
        out[w] = max(err, 0.0) / n
    return out


def _without_widths(config: FusionConfig) -> FusionConfig:
    import copy

    c = copy.copy(config)
    c.widths = None
    return c


def _plain_act(act):
    """The activation without a count vector (the candidates carry their own counts)."""
    return getattr(act, "act", act)
