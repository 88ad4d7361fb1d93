"""Calibration of a fused model on a little text: least-squares refit and layer-wise distillation.

Fusion is data-free; on an untuned model it costs a lot of fidelity. Both steps here pay some of it
back with a few hundred sentences, layer by layer in order, so that every fused layer is fitted on
the inputs that the already calibrated layers before it produce:

- **refit** (closed form): with the fused MLP's hidden features h = n * act(W1' x + b1') (n = the
  frozen count vector when the layer has one, else 1), solve the ridge least squares
  min ||[h, 1] [W2'^T; b2] - f(x)||^2 against the ORIGINAL MLP's output f(x) on the same inputs x
  (float64 normal equations). The count buffer is untouched, so the saved format is unchanged.
  A layer keeps its old weights when the refit does not lower its error.
- **distill** (`distill_steps` > 0): Adam on the fused MLP's parameters (W1', b1', W2', b2; the counts
  are buffers and stay frozen) towards the original MLP's output, mean squared error on the same
  inputs. Again kept only when it lowers the layer's error.
- **token weighting** (default): both steps weight each token's squared error by 1 / the feature
  variance of the residual sum it feeds, the scale the next LayerNorm divides by (`token_weights`).
- **data-aware clustering** (`data_metrics`): the statistics of the original MLPs' inputs that
  `fuse(..., metrics=...)` clusters with, before any of the above (see `fusion.DataMetric`).

Works on BERT, RoBERTa and GPT-2 originals and their fused models (custom "mlpfusion_*" types and
stock-type results of `fold_scale`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .architectures import get_adapter
from .architectures.base import Adapter, MLPWeights
from .errors import InvalidConfigError
from .fusion import DataMetric

RIDGE = 1e-6  # times the mean diagonal of the normal matrix
DISTILL_LR = 1e-3  # measured on MiniLM: 1e-3 beat 1e-4 at 300 steps
DISTILL_BATCH_TOKENS = 2048


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input is captured."""


# --- helpers shared with evaluate.py ------------------------------------------------------------


def adapter_for(model) -> Adapter:
    """The adapter of a stock model or of a fused one ("mlpfusion_bert" -> the BERT adapter)."""
    model_type = str(getattr(model.config, "model_type", "")).removeprefix("mlpfusion_")
    return get_adapter(model_type)


def activation(block: nn.Module):
    """The MLP's activation function of one block (BERT/RoBERTa: intermediate; GPT-2: mlp.act)."""
    inter = getattr(block, "intermediate", None)
    if inter is not None and hasattr(inter, "intermediate_act_fn"):
        return inter.intermediate_act_fn
    return block.mlp.act


def mlp_hidden(adapter: Adapter, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(W1 x + b1) of one block (before any count scaling)."""
    fc1, _ = adapter.mlp_modules(block)
    return activation(block)(fc1(x))


def mlp_apply(adapter: Adapter, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole MLP of one block: W2 (n * act(W1 x + b1)) + b2 (fc2 applies the counts itself)."""
    _, fc2 = adapter.mlp_modules(block)
    return fc2(mlp_hidden(adapter, block, x))


def counts_of(adapter: Adapter, block: nn.Module) -> torch.Tensor | None:
    _, fc2 = adapter.mlp_modules(block)
    return getattr(fc2, "counts", None)


def fused_layers(original, fused) -> list[int]:
    """Indices of the fused layers: the metadata's list, else every layer whose MLP changed shape."""
    meta = getattr(fused.config, "mlpfusion", None) or {}
    if meta.get("layers"):
        return [int(i) for i in meta["layers"]]
    ao, af = adapter_for(original), adapter_for(fused)
    out = []
    for i, (bo, bf) in enumerate(zip(ao.blocks(original), af.blocks(fused))):
        if ao.read(bo).width != af.read(bf).width or counts_of(af, bf) is not None:
            out.append(i)
    return out


def max_tokens(model) -> int:
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 512
    if str(getattr(cfg, "model_type", "")).removeprefix("mlpfusion_") == "roberta":
        n -= (getattr(cfg, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
    return int(n)


def prepare_tokenizer(tokenizer):
    """A tokenizer that can pad (GPT-2's has no pad token: use its end-of-text token)."""
    if getattr(tokenizer, "pad_token", "x") is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def batches(texts: list[str], tokenizer, *, max_length: int, batch_size: int, model=None):
    """Tokenised batches (input_ids, attention_mask) of `texts`, truncated to what `model` accepts."""
    if not texts:
        raise InvalidConfigError("no text to run the model on: give at least one sample")
    tokenizer = prepare_tokenizer(tokenizer)
    if model is not None:
        max_length = min(max_length, max_tokens(model))
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def visit_inputs(model, modules: list[nn.Module], stop: nn.Module, encoded, visit: Callable[[int, torch.Tensor], None]) -> None:
    """Run `model` on the batches `encoded` only until `stop` (one of `modules`, the last of them to
    run) is reached, calling `visit(j, x)` with the first input of `modules[j]` at the non-padding
    tokens ([N, d], float32, on the CPU) of every batch."""
    mask_box: list[torch.Tensor] = []

    def grab(j):
        def hook(module, args):
            visit(j, args[0][mask_box[0].bool()].detach().float().cpu())
            if module is stop:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(grab(j)) for j, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in encoded:
                mask_box[:] = [batch["attention_mask"]]
                try:
                    model.base_model(**{k: v.to(model.device) for k, v in batch.items()})
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def capture_inputs(model, modules: list[nn.Module], stop: nn.Module, encoded: list[dict]) -> list[torch.Tensor]:
    """The first input of each of `modules` at the non-padding tokens ([N, d] each), running `model`
    on `encoded` only until `stop` (one of `modules`, the last of them to run) is reached."""
    got: list[list[torch.Tensor]] = [[] for _ in modules]
    visit_inputs(model, modules, stop, encoded, lambda j, x: got[j].append(x))
    return [torch.cat(g) for g in got]


def capture_mlp_inputs(model, layer: int, encoded: list[dict]) -> torch.Tensor:
    """The hidden states entering layer `layer`'s MLP in `model`, at the non-padding tokens: [N, d]."""
    adapter = adapter_for(model)
    fc1, _ = adapter.mlp_modules(adapter.blocks(model)[layer])
    return capture_inputs(model, [fc1], fc1, encoded)[0]


def capture_mlp_and_residual(model, layer: int, encoded: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP input x, residual stream r) of layer `layer`: the block computes r + MLP(x) (before any norm)."""
    adapter = adapter_for(model)
    block = adapter.blocks(model)[layer]
    fc1, _ = adapter.mlp_modules(block)
    res = adapter.residual_input(block)
    if res is fc1:
        x = capture_inputs(model, [fc1], fc1, encoded)[0]
        return x, x
    x, r = capture_inputs(model, [fc1, res], fc1, encoded)
    return x, r


# --- data-aware clustering: input statistics of the original MLPs --------------------------------


class _MetricStats:
    """Running sums over tokens for one layer: E[[x,1][x,1]^T], E[act(a)^2], E[act'(a)^2] per neuron,
    with a = W1 x + b1 computed from the layer's weights `w` (canonical orientation)."""

    def __init__(self, w: MLPWeights, act):
        self.w1, self.b1 = w.w1.detach(), w.b1.detach()  # [p, d], [p], the model's dtype
        self.w2 = w.w2.detach().double()
        self.act = act
        p, d = self.w1.shape
        self.xx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        self.act2 = torch.zeros(p, dtype=torch.float64)
        self.grad2 = torch.zeros(p, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xx += xa.T @ xa
        with torch.enable_grad():
            a = nn.functional.linear(x.to(self.w1), self.w1, self.b1).double().cpu().requires_grad_(True)
            out = self.act(a)
            (g,) = torch.autograd.grad(out.sum(), a)
        self.act2 += out.detach().pow(2).sum(0)
        self.grad2 += g.pow(2).sum(0)
        self.n += x.shape[0]

    def metric(self) -> DataMetric:
        n = max(self.n, 1)
        S = self.xx / n
        S = S + torch.eye(S.shape[0], dtype=S.dtype) * (1e-6 * float(S.diagonal().mean().clamp_min(1e-30)))
        L = torch.linalg.cholesky(S)
        w2n = self.w2.pow(2).sum(0)  # ||W2[:, i]||^2
        s1 = (w2n * self.grad2 / n).mean().sqrt()
        s2 = (self.act2 / n).mean().sqrt()
        return DataMetric(L, s1, s2, tokens=self.n)


def data_metrics(model, layers: list[int], texts: list[str], tokenizer, *, max_length: int = 128,
                 batch_size: int = 16) -> dict[int, DataMetric]:
    """The `DataMetric` of each of `layers` (input statistics of the model's own MLPs on `texts`),
    for data-aware clustering: `fuse(model, config, metrics=data_metrics(model, layers, ...))`."""
    if not texts:
        raise InvalidConfigError("data-aware clustering needs at least one text sample")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    layers = sorted(set(int(i) for i in layers))
    stats = [_MetricStats(adapter.read(blocks[i]), activation(blocks[i])) for i in layers]
    fc1s = [adapter.mlp_modules(blocks[i])[0] for i in layers]
    was_training = model.training
    model.eval()
    try:
        encoded = batches(texts, tokenizer, max_length=max_length, batch_size=batch_size, model=model)
        visit_inputs(model, fc1s, fc1s[-1], encoded, lambda j, x: stats[j].add(x))
    finally:
        model.train(was_training)
    return {i: st.metric() for i, st in zip(layers, stats)}


# --- the two steps on one layer -----------------------------------------------------------------


def _sq_error(adapter, block, x, y, w: torch.Tensor | None = None, chunk: int = 8192) -> float:
    """sum_t w_t ||f'(x_t) - y_t||^2 (w = 1 when None)."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            e = (mlp_apply(adapter, block, x[s : s + chunk]).double() - y[s : s + chunk].double()).pow(2).sum(1)
            total += float((e * w[s : s + chunk].double()).sum() if w is not None else e.sum())
    return total


def token_weights(s: torch.Tensor) -> torch.Tensor:
    """1 / the variance over features of each token's residual sum s ([N, d] -> [N], mean 1).

    A LayerNorm (right after the block in BERT/RoBERTa, before the next sub-layer in GPT-2) divides
    each token by that spread, so an error of the same size costs more on a token with a small
    residual stream than on one of the few tokens with a huge one. Weighting by it fits the errors
    the next layers actually see."""
    var = s.double().var(dim=1, unbiased=False).clamp_min(1e-12)
    w = 1.0 / var
    return (w / w.mean()).float()


def refit_layer(adapter: Adapter, block: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ridge: float = RIDGE,
                w: torch.Tensor | None = None, chunk: int = 8192) -> tuple[float, float, bool]:
    """(Weighted) least-squares refit of one fused MLP's output projection and bias, token weights `w`
    (None = 1). Returns (old squared error, new squared error, whether the new weights were kept)."""
    fc1, fc2 = adapter.mlp_modules(block)
    counts = counts_of(adapter, block)
    has_bias = fc2.bias is not None
    cur = adapter.read(block)
    k = cur.width
    m = k + int(has_bias)
    A = torch.zeros(m, m, dtype=torch.float64)
    B = torch.zeros(m, y.shape[1], dtype=torch.float64)
    yy = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            h = mlp_hidden(adapter, block, x[s : s + chunk].to(fc1.weight.dtype)).double()
            if counts is not None:
                h = h * counts.double()
            if has_bias:
                h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
            t = y[s : s + chunk].double()
            wt = w[s : s + chunk].double()[:, None] if w is not None else torch.ones(h.shape[0], 1, dtype=h.dtype)
            hw = h * wt
            A += hw.T @ h
            B += hw.T @ t
            yy += float((wt * t.pow(2)).sum())
    old = torch.cat([cur.w2.detach().double().T] + ([fc2.bias.detach().double()[None]] if has_bias else []))  # [m, d]

    def err(W):
        return float((W * (A @ W)).sum() - 2 * (W * B).sum() + yy)

    lam = ridge * float(A.diagonal().mean().clamp_min(1e-30))
    reg = torch.eye(m, dtype=torch.float64) * lam
    if has_bias:
        reg[-1, -1] = 0.0  # do not shrink the bias
    try:
        W = torch.linalg.solve(A + reg, B)
    except RuntimeError:  # singular even with the ridge: fall back to least squares
        W = torch.linalg.lstsq(A + reg, B).solution
    before, after = err(old), err(W)
    if not (after < before):
        return before, before, False
    new = MLPWeights(cur.w1.detach(), cur.b1.detach(), W[:k].T.to(fc2.weight.dtype),
                     W[k].to(fc2.weight.dtype) if has_bias else None)
    _, _, t2, tb2 = adapter.tensors(new)
    with torch.no_grad():
        fc2.weight.copy_(t2)
        if has_bias:
            fc2.bias.copy_(tb2)
    # the exact error of what is now in the module (the normal-equation value can round)
    exact = _sq_error(adapter, block, x, y, w)
    return before, exact, True


def distill_layer(adapter: Adapter, block: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *,
                  lr: float = DISTILL_LR, batch_tokens: int = DISTILL_BATCH_TOKENS, seed: int = 0,
                  w: torch.Tensor | None = None) -> tuple[float, float, bool]:
    """`steps` Adam steps on the fused MLP's parameters (counts stay frozen) towards y = original MLP(x).
    Returns (old squared error, new squared error, whether the new weights were kept)."""
    fc1, fc2 = adapter.mlp_modules(block)
    params = [p for mod in (fc1, fc2) for p in mod.parameters(recurse=False)]
    saved = [p.detach().clone() for p in params]
    before = _sq_error(adapter, block, x, y, w)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    ww = w if w is not None else torch.ones(x.shape[0])
    scale = float((ww[:, None] * y.pow(2)).mean().clamp_min(1e-12))
    n = x.shape[0]
    try:
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, n, (min(batch_tokens, n),), generator=gen)
                out = mlp_apply(adapter, block, x[idx].to(fc1.weight.dtype))
                loss = (ww[idx, None] * (out.float() - y[idx].float()).pow(2)).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    after = _sq_error(adapter, block, x, y, w)
    if not (after < before):
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return before, before, False
    return before, after, True


# --- the whole model ----------------------------------------------------------------------------


def calibrate(original, fused, texts: list[str], tokenizer, *, refit: bool = True, distill_steps: int = 0,
              max_length: int = 128, batch_size: int = 16, seed: int = 0, ridge: float = RIDGE,
              distill_lr: float = DISTILL_LR, target: str = "residual", weighting: str = "token",
              progress: Callable[[str], None] | None = None) -> dict:
    """Calibrate `fused` (in place) towards `original` on `texts`; returns a JSON-able summary.

    Layer by layer, in order: capture the inputs of the fused layer's MLP in the fused model (so the
    already calibrated layers before it shape them), then refit (closed form) and/or distill towards
    a target, recording the relative squared error ||f'(x) - y||^2 / ||y||^2 before and after.

    `target="residual"` (default): y = f(x_o) + r_o - r_f, so that the fused block's residual sum
    r_f + f'(x_f) matches the original's r_o + f(x_o) at the same tokens. Each layer then also
    corrects the drift that the fused layers below it left in the residual stream.
    `target="local"`: y = f(x_f), the original MLP on the fused model's inputs (the layer alone).

    `weighting="token"` (default) weights each token's squared error by `token_weights` of the
    residual sum the target stands for (what the next LayerNorm divides by); `"uniform"`: every token
    alike. Measured on MiniLM layers 2-5 with 300 distillation steps: 0.946 -> 0.950 held-out cosine.
    """
    if target not in ("residual", "local"):
        raise InvalidConfigError(f"unknown calibration target {target!r}: use 'residual' or 'local'")
    if weighting not in ("uniform", "token"):
        raise InvalidConfigError(f"unknown calibration weighting {weighting!r}: use 'uniform' or 'token'")
    say = progress or (lambda msg: None)
    if distill_steps < 0:
        raise InvalidConfigError(f"distill steps {distill_steps} is negative: use 0 (off) or more")
    if not texts:
        raise InvalidConfigError("calibration needs at least one text sample")
    ao, af = adapter_for(original), adapter_for(fused)
    blocks_o, blocks_f = ao.blocks(original), af.blocks(fused)
    if len(blocks_o) != len(blocks_f):
        raise InvalidConfigError(
            f"the original has {len(blocks_o)} layers and the fused model {len(blocks_f)}: calibrate against "
            "the model it was fused from"
        )
    layers = fused_layers(original, fused)
    encoded = list(batches(texts, tokenizer, max_length=max_length, batch_size=batch_size, model=fused))
    was_training = (original.training, fused.training)
    original.eval()
    fused.eval()
    report = []
    tokens = 0
    try:
        for i in layers:
            say(f"calibrating layer {i} ({layers.index(i) + 1}/{len(layers)})")
            x, r_f = capture_mlp_and_residual(fused, i, encoded)
            tokens = x.shape[0]
            x_o, r_o = capture_mlp_and_residual(original, i, encoded) if target == "residual" else (x, r_f)
            with torch.no_grad():
                y = torch.cat([mlp_apply(ao, blocks_o[i], x_o[s : s + 8192].to(original.dtype)).float()
                               for s in range(0, x.shape[0], 8192)])
                if target == "residual":
                    y = y + (r_o - r_f)
                w = token_weights(y + r_f) if weighting == "token" else None  # y + r_f: the whole residual sum
            ref = float(((w.double()[:, None] if w is not None else 1.0) * y.double().pow(2)).sum().clamp_min(1e-30))
            entry = {"layer": i, "error_before": _sq_error(af, blocks_f[i], x, y, w) / ref}
            if refit:
                _, after, kept = refit_layer(af, blocks_f[i], x, y, ridge=ridge, w=w)
                entry["refit_kept"] = kept
                entry["error_after_refit"] = after / ref
            if distill_steps:
                _, after, kept = distill_layer(af, blocks_f[i], x, y, distill_steps, lr=distill_lr, seed=seed + i, w=w)
                entry["distill_kept"] = kept
                entry["error_after_distill"] = after / ref
                if refit and kept:  # W1' moved: the best W2', b2 for it are one more solve away
                    _, after, kept = refit_layer(af, blocks_f[i], x, y, ridge=ridge, w=w)
                    entry["final_refit_kept"] = kept
            entry["error_after"] = _sq_error(af, blocks_f[i], x, y, w) / ref
            report.append(entry)
    finally:
        original.train(was_training[0])
        fused.train(was_training[1])
    return {
        "samples": len(texts),
        "tokens": int(tokens),
        "refit": bool(refit),
        "target": target,
        "weighting": weighting,
        "ridge": ridge if refit else None,
        "distill_steps": int(distill_steps),
        "distill_lr": distill_lr if distill_steps else None,
        "layers": report,
    }
