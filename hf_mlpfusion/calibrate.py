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

Works on every supported family, original or fused (custom fused types and the stock-type results
of `fold_scale`), through the model's `Family`. Half-precision models are calibrated in float32
and keep their own dtype.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .core.metric import DataMetric, MetricStats
from .core.mlp import hidden
from .errors import InvalidConfigError
from .families import Family, family_of
from .propagate import at_tokens, compute_device, on_device, run_block, trace

RIDGE = 1e-6  # times the mean diagonal of the normal matrix
GRAM_DTYPE = torch.float32  # products of one chunk of tokens in the refit, summed over chunks in float64
# (measured on MiniLM: the same refit errors to 5 digits as float64 products, in a quarter of the time)
DISTILL_LR = 1e-3  # measured on MiniLM: 1e-3 beat 1e-4 at 300 steps
DISTILL_BATCH_TOKENS = 2048


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input is captured."""


# --- helpers shared with evaluate.py ------------------------------------------------------------


def mlp_hidden(family: Family, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden features of one block, as its output projection sees them (a fused layer's
    activation module includes its count vector)."""
    ins, _ = family.projections(block)
    return hidden(family.kind, family.act(block), [m(x) for m in ins])


def mlp_apply(family: Family, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole MLP of one block."""
    _, out = family.projections(block)
    return out(mlp_hidden(family, block, x))


def mlp_dtype(family: Family, block: nn.Module) -> torch.dtype:
    return family.projections(block)[1].weight.dtype


class float32:
    """Context manager: the models' floating-point tensors in float32, restored to their own dtypes after.

    float16/bfloat16 -> float32 -> back is exact for the tensors calibration does not change."""

    def __init__(self, *models):
        self.models = models
        self.saved: list[tuple[torch.Tensor, torch.dtype]] = []

    def __enter__(self):
        self.saved += cast_float32(*self.models)
        return self

    def __exit__(self, *exc):
        for t, dtype in self.saved:
            t.data = t.data.to(dtype)
        self.saved.clear()
        return False


def cast_float32(*models) -> list[tuple[torch.Tensor, torch.dtype]]:
    """The models' floating-point tensors (not those on the meta device) in float32, in place; returns
    (tensor, its former dtype) of each one cast."""
    saved = []
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32 and not t.is_meta:
                saved.append((t, t.dtype))
                t.data = t.data.float()
    return saved


def fused_layers(original, fused) -> list[int]:
    """Indices of the fused layers: the metadata's list, else every layer whose MLP changed shape."""
    meta = getattr(fused.config, "mlpfusion", None) or {}
    if meta.get("layers"):
        return [int(i) for i in meta["layers"]]
    fo, ff = family_of(original), family_of(fused)
    out = []
    for i, (bo, bf) in enumerate(zip(fo.block_list(original), ff.block_list(fused))):
        if fo.read(bo).width != ff.read(bf).width or hasattr(ff.act(bf), "counts"):
            out.append(i)
    return out


def max_tokens(model) -> int:
    return family_of(model).max_positions(model.config)


# A vocabulary: without one of these, transformers still builds a tokenizer, of special tokens only,
# that turns every text into two tokens (or a row of unknown ones): useless, and silently so.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model", "merges.txt", "bpe.codes", "vocab.model", "source.spm")
MIN_KNOWN_TOKENS = 0.05  # below 1 in 20 real tokens the text says nothing to the model


def has_tokenizer_files(folder) -> bool:
    from pathlib import Path

    folder = Path(folder)
    return any((folder / name).is_file() for name in VOCABULARY_FILES) or any(folder.glob("*.model"))


def check_tokenizer(tokenizer, texts: list[str], *, where: str, sample: int = 64) -> None:
    """Refuse a tokenizer that cannot tokenise `texts` meaningfully: no vocabulary beyond its special
    tokens, or fewer than 1 in 20 of the tokens of the first `sample` texts known (not special or
    unknown). Such a tokenizer makes calibration and evaluation silently useless."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "unk_token_id", None) is not None:
        special.add(tokenizer.unk_token_id)
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    if size is not None and size <= len(special):
        raise InvalidConfigError(
            f"the tokenizer of {where} has no vocabulary ({size} special tokens only): its tokenizer files are "
            "missing or broken; copy the tokenizer files of the model it came from"
        )
    texts = [t for t in texts[:sample] if t.strip()]
    if not texts:
        return
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    known = sum(1 for x in ids for t in x if t not in special)
    if total == 0 or known < MIN_KNOWN_TOKENS * total:
        raise InvalidConfigError(
            f"the tokenizer of {where} turns the text into {'nothing' if total == 0 else f'{total - known} unknown tokens of {total}'}: "
            "it does not fit this text or its files are broken; copy the tokenizer files of the model it came from"
        )


def prepare_tokenizer(tokenizer):
    """A tokenizer that can pad (GPT-2's has no pad token: use its end-of-text token)."""
    if getattr(tokenizer, "pad_token", "x") is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def batches(texts: list[str], tokenizer, *, max_length: int, batch_size: int, model=None, by_length: bool = False):
    """Tokenised batches (input_ids, attention_mask) of `texts`, truncated to what `model` accepts.

    `by_length=True` batches the texts in order of their token count (a stable sort, so the same
    texts give the same batches), for passes that only sum over tokens (statistics, calibration):
    on the built-in mix it halves the padded tokens the model runs on."""
    if not texts:
        raise InvalidConfigError("no text to run the model on: give at least one sample")
    tokenizer = prepare_tokenizer(tokenizer)
    if model is not None:
        max_length = min(max_length, max_tokens(model))
    extra = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    if max_length <= extra:  # the tokenizer cannot truncate below its own special tokens: it would not truncate at all
        raise InvalidConfigError(
            f"max length {max_length} leaves no room for text: this tokenizer adds {extra} special tokens; "
            f"use at least {extra + 1}"
        )
    if by_length:
        lengths = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda j: len(lengths[j]))
        texts = [texts[j] for j in order]
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        if enc["input_ids"].shape[1] > max_length:
            raise InvalidConfigError(f"the tokenizer did not truncate to {max_length} tokens: use a larger max length")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def visit_inputs(model, modules: list[nn.Module], stop: nn.Module, encoded, visit: Callable[[int, torch.Tensor], None]) -> None:
    """Run `model` on the batches `encoded` only until `stop` (one of `modules`, the last of them to
    run) is reached, calling `visit(j, x)` with the first input of `modules[j]` at the non-padding
    tokens ([N, d], float32, on the CPU) of every batch."""
    mask_box: list[torch.Tensor] = []

    def grab(j):
        def hook(module, args):
            visit(j, at_tokens(args[0], mask_box[0]))
            if module is stop:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(grab(j)) for j, m in enumerate(modules)]
    try:
        run_batches(model, encoded, mask_box)
    finally:
        for h in handles:
            h.remove()


def run_batches(model, encoded, mask_box: list[torch.Tensor]) -> None:
    """Run `model`'s body on each batch of `encoded` without gradients, with the batch's attention
    mask in `mask_box[0]` for the hooks to read; a hook raising `_Stop` ends that batch's pass."""
    with torch.no_grad():
        for batch in encoded:
            mask_box[:] = [batch["attention_mask"]]
            try:
                model.base_model(**{k: v.to(model.device) for k, v in batch.items()})
            except _Stop:
                pass


def capture_inputs(model, modules: list[nn.Module], stop: nn.Module, encoded: list[dict]) -> list[torch.Tensor]:
    """The first input of each of `modules` at the non-padding tokens ([N, d] each), running `model`
    on `encoded` only until `stop` (one of `modules`, the last of them to run) is reached."""
    got: list[list[torch.Tensor]] = [[] for _ in modules]
    visit_inputs(model, modules, stop, encoded, lambda j, x: got[j].append(x))
    return [torch.cat(g) for g in got]


def capture_mlp_inputs(model, layer: int, encoded: list[dict]) -> torch.Tensor:
    """The hidden states entering layer `layer`'s MLP in `model`, at the non-padding tokens: [N, d]."""
    family = family_of(model)
    first = family.projections(family.block_list(model)[layer])[0][0]
    return capture_inputs(model, [first], first, encoded)[0]


def capture_mlp_and_residual(model, layer: int, encoded: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP input x, residual stream r) of layer `layer`: the block computes r + MLP(x) (before any norm)."""
    family = family_of(model)
    block = family.block_list(model)[layer]
    first = family.projections(block)[0][0]
    res = family.residual_input(block)
    if res is None:  # post-LN: the residual stream is the MLP's own input
        x = capture_inputs(model, [first], first, encoded)[0]
        return x, x
    x, r = capture_inputs(model, [first, res], first, encoded)
    return x, r


def stats_hooks(family: Family, block: nn.Module, stats: MetricStats, mask: Callable[[], torch.Tensor]) -> list:
    """Hooks that add each batch's MLP inputs and pre-activations (the model's own: no second matrix
    product) at the non-padding tokens of `mask()` to `stats`. Returns the hook handles."""
    ins = family.projections(block)[0]
    pending: dict = {}

    def on_input(module, args):
        pending.clear()
        pending["x"] = at_tokens(args[0], mask())

    def on_projection(q):
        def hook(module, args, out):
            pending[q] = at_tokens(out, mask())
            if len(pending) == len(ins) + 1:
                stats.add(pending.pop("x"), [pending.pop(k) for k in range(len(ins))])
        return hook

    return [ins[0].register_forward_pre_hook(on_input)] + \
        [m.register_forward_hook(on_projection(q)) for q, m in enumerate(ins)]


def metric_run(family: Family, block: nn.Module, data_aware: bool = True):
    """(MetricStats of the block's MLP or None, the `hooks` argument of `run_block` that fills it)."""
    if not data_aware:
        return None, None
    stats = MetricStats(family.read(block), family.act(block))
    return stats, (lambda mask: stats_hooks(family, block, stats, mask))


# --- data-aware clustering: input statistics of the original MLPs --------------------------------


def data_metrics(model, layers: list[int], texts: list[str], tokenizer, *, max_length: int = 128,
                 batch_size: int = 16, device=None) -> dict[int, DataMetric]:
    """The `DataMetric` of each of `layers` (input statistics of the model's own MLPs on `texts`),
    for data-aware clustering: `fuse(model, config, metrics=data_metrics(model, layers, ...))`.

    Block by block on stored hidden states (`propagate`), each block and its statistics on `device`
    (None: where the model is); the model itself stays where it is."""
    if not texts:
        raise InvalidConfigError("data-aware clustering needs at least one text sample")
    family = family_of(model)
    blocks = family.block_list(model)
    layers = sorted(set(int(i) for i in layers))
    encoded = list(batches(texts, tokenizer, max_length=max_length, batch_size=batch_size, model=model, by_length=True))
    was_training = model.training
    model.eval()
    out: dict[int, DataMetric] = {}
    try:
        with float32(model):
            dev = compute_device(model, device)
            tr = trace(model, family, encoded).to(dev)
            h = tr.hidden
            for i in range(max(layers) + 1 if layers else 0):
                with on_device(blocks[i], dev):
                    if i not in layers:
                        h, _ = run_block(blocks[i], tr, i, h)
                        continue
                    stats, hooks = metric_run(family, blocks[i])
                    last = i == max(layers)  # the hidden states after it are not needed
                    h, _ = run_block(blocks[i], tr, i, h, hooks=hooks,
                                     stop=mlp_stop(family, blocks[i], statistics=True) if last else None)
                    out[i] = stats.metric()
                    del stats
    finally:
        model.train(was_training)
    return out


# --- the two steps on one layer -----------------------------------------------------------------


ERROR_CHUNK = 2048  # tokens per partial sum of `_sq_error`


def _sq_error(family: Family, block, x, y, w: torch.Tensor | None = None, chunk: int = ERROR_CHUNK) -> float:
    """sum_t w_t ||f'(x_t) - y_t||^2 (w = 1 when None)."""
    total = 0.0
    dtype = mlp_dtype(family, block)
    dev = family.projections(block)[1].weight.device
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            total += _piece_error(mlp_apply(family, block, x[s : s + chunk].to(dev, dtype)), y[s : s + chunk],
                                  None if w is None else w[s : s + chunk])
    return total


def _piece_error(pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> float:
    """sum_t w_t ||pred_t - y_t||^2 of one piece of tokens, in float64 (the partial sum of `_sq_error`)."""
    e = (pred.double() - y.to(pred.device).double()).pow(2).sum(1)
    return float((e * w.to(pred.device).double()).sum() if w is not None else e.sum())


def token_weights(s: torch.Tensor) -> torch.Tensor:
    """1 / the variance over features of each token's residual sum s ([N, d] -> [N], mean 1).

    A LayerNorm (right after the block in BERT/RoBERTa, before the next sub-layer in GPT-2) divides
    each token by that spread, so an error of the same size costs more on a token with a small
    residual stream than on one of the few tokens with a huge one. Weighting by it fits the errors
    the next layers actually see."""
    var = s.double().var(dim=1, unbiased=False).clamp_min(1e-12)
    w = 1.0 / var
    return (w / w.mean()).float()


def solve_normal(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The solution of the (ridge-regularised) normal equations A W = B. LU, not `torch.linalg.lstsq`,
    which gives different last bits from run to run on the CPU; least squares only when A is singular."""
    try:
        return torch.linalg.solve(A, B)
    except RuntimeError:  # singular even with the ridge
        return torch.linalg.lstsq(A, B).solution


def refit_layer(family: Family, block: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ridge: float = RIDGE,
                w: torch.Tensor | None = None, chunk: int = 8192, toward_current: bool = False) -> tuple[float, float, bool]:
    """(Weighted) least-squares refit of one fused MLP's output projection and bias, token weights `w`
    (None = 1). Returns (old squared error, new squared error, whether the new weights were kept): both
    exact (`_sq_error`'s numbers; the old one from the pass that sums the normal equations).

    The ridge pulls toward zero, or with `toward_current=True` toward the weights the layer has
    (measured in benchmarks/ridge_prior.py and not adopted: docs/domains.md)."""
    _, out = family.projections(block)
    has_bias = out.bias is not None
    cur = family.read(block)
    k = cur.width
    m = k + int(has_bias)
    dtype, dev = out.weight.dtype, out.weight.device
    A = torch.zeros(m, m, dtype=torch.float64, device=dev)
    B = torch.zeros(m, y.shape[1], dtype=torch.float64, device=dev)
    yy = 0.0
    exact_old = 0.0
    chunk = max(ERROR_CHUNK, chunk // ERROR_CHUNK * ERROR_CHUNK)  # whole pieces of the error's partial sums
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            h = mlp_hidden(family, block, x[s : s + chunk].to(dev, dtype))  # counts included
            for p in range(s, min(s + chunk, x.shape[0]), ERROR_CHUNK):  # `_sq_error`'s pieces, its memory
                exact_old += _piece_error(out(h[p - s : p - s + ERROR_CHUNK]), y[p : p + ERROR_CHUNK],
                                          None if w is None else w[p : p + ERROR_CHUNK])
            h = h.to(GRAM_DTYPE)
            if has_bias:
                h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=dev)], dim=1)
            t = y[s : s + chunk].to(dev, GRAM_DTYPE)
            wt = w[s : s + chunk].to(dev, GRAM_DTYPE)[:, None] if w is not None else \
                torch.ones(h.shape[0], 1, dtype=h.dtype, device=dev)
            hw = h * wt
            A += (hw.T @ h).double()
            B += (hw.T @ t).double()
            yy += float((wt.double() * t.double().pow(2)).sum())
    old = torch.cat([cur.out[0].detach().double().T] + ([out.bias.detach().double()[None]] if has_bias else []))  # [m, d]

    def err(W):
        return float((W * (A @ W)).sum() - 2 * (W * B).sum() + yy)

    lam = ridge * float(A.diagonal().mean().clamp_min(1e-30))
    reg = torch.eye(m, dtype=torch.float64, device=dev) * lam
    if has_bias:
        reg[-1, -1] = 0.0  # do not shrink the bias
    rhs = B + reg @ old if toward_current else B
    W = solve_normal(A + reg, rhs)
    if not (err(W) < err(old)):  # (the normal equations' values: the same rounding on both sides)
        return exact_old, exact_old, False
    family.write_output(block, W[:k].T, W[k] if has_bias else None)
    # the exact error of what is now in the module (the normal-equation value can round)
    exact = _sq_error(family, block, x, y, w)
    return exact_old, exact, True


def distill_layer(family: Family, block: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *,
                  lr: float = DISTILL_LR, batch_tokens: int = DISTILL_BATCH_TOKENS, seed: int = 0,
                  w: torch.Tensor | None = None, before: float | None = None) -> tuple[float, float, bool]:
    """`steps` Adam steps on the fused MLP's parameters (counts stay frozen) towards y = original MLP(x).
    Returns (old squared error, new squared error, whether the new weights were kept). `before`: the
    exact error the layer has now when the caller knows it (`refit_layer` returned it), else measured."""
    ins, out = family.projections(block)
    params = [p for mod in (*ins, out) for p in mod.parameters(recurse=False)]
    saved = [p.detach().clone() for p in params]
    before = _sq_error(family, block, x, y, w) if before is None else before
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))  # on the CPU: the same draws on every device
    ww = w if w is not None else torch.ones(x.shape[0], device=x.device)
    scale = float((ww[:, None] * y.pow(2)).mean().clamp_min(1e-12))
    n = x.shape[0]
    dtype = out.weight.dtype
    try:
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, n, (min(batch_tokens, n),), generator=gen).to(x.device)
                pred = mlp_apply(family, block, x[idx].to(dtype))
                loss = (ww[idx, None] * (pred.float() - y[idx].float()).pow(2)).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    after = _sq_error(family, block, x, y, w)
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
              progress: Callable[[str], None] | None = None, device=None) -> dict:
    """Calibrate `fused` (in place) towards `original` on `texts`; returns a JSON-able summary.

    `device`: where the blocks run and the activations, refit and distillation live (None: where the
    fused model is); each block visits it in turn and both models stay where they are.

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
    check_calibration_options(distill_steps=distill_steps, texts=texts, target=target, weighting=weighting)
    say = progress or (lambda msg: None)
    fo, ff = family_of(original), family_of(fused)
    blocks_o, blocks_f = fo.block_list(original), ff.block_list(fused)
    if len(blocks_o) != len(blocks_f):
        raise InvalidConfigError(
            f"the original has {len(blocks_o)} layers and the fused model {len(blocks_f)}: calibrate against "
            "the model it was fused from"
        )
    layers = fused_layers(original, fused)
    encoded = list(batches(texts, tokenizer, max_length=max_length, batch_size=batch_size, model=fused,
                           by_length=True))
    was_training = (original.training, fused.training)
    original.eval()
    fused.eval()
    try:
        with float32(original, fused):
            report, tokens = _calibrate_layers(original, fused, fo, ff, blocks_o, blocks_f, layers, encoded, refit=refit,
                                               distill_steps=distill_steps, seed=seed, ridge=ridge,
                                               distill_lr=distill_lr, target=target, weighting=weighting, say=say,
                                               device=compute_device(fused, device))
    finally:
        original.train(was_training[0])
        fused.train(was_training[1])
    return summary(len(texts), tokens, report, refit=refit, target=target, weighting=weighting, ridge=ridge,
                   distill_steps=distill_steps, distill_lr=distill_lr)


def check_calibration_options(*, distill_steps: int, texts: list[str], target: str = "residual",
                              weighting: str = "token") -> None:
    if target not in ("residual", "local"):
        raise InvalidConfigError(f"unknown calibration target {target!r}: use 'residual' or 'local'")
    if weighting not in ("uniform", "token"):
        raise InvalidConfigError(f"unknown calibration weighting {weighting!r}: use 'uniform' or 'token'")
    if distill_steps < 0:
        raise InvalidConfigError(f"distill steps {distill_steps} is negative: use 0 (off) or more")
    if not texts:
        raise InvalidConfigError("calibration needs at least one text sample")


def summary(samples: int, tokens: int, report: list[dict], *, refit: bool, target: str, weighting: str, ridge: float,
            distill_steps: int, distill_lr: float) -> dict:
    """The JSON-able record of a calibration (the fused config's `mlpfusion.calibration`)."""
    return {
        "samples": samples,
        "tokens": int(tokens),
        "refit": bool(refit),
        "target": target,
        "weighting": weighting,
        "ridge": ridge if refit else None,
        "distill_steps": int(distill_steps),
        "distill_lr": distill_lr if distill_steps else None,
        "layers": report,
    }


def mlp_points(family: Family, block: nn.Module, *, mlp_input: bool = True) -> dict[str, nn.Module]:
    """The modules whose first input is the MLP's input ("x") and the residual stream ("r").

    `mlp_input=False`: only what the original model's run gives `fit_layer` when the fused model has
    inputs of its own (the residual stream; the MLP input only where it is the residual stream too)."""
    points = {"x": family.projections(block)[0][0]}
    residual = family.residual_input(block)
    if residual is not None:
        points["r"] = residual
        if not mlp_input:
            del points["x"]
    return points


def mlp_stop(family: Family, block: nn.Module, *, statistics: bool = False) -> nn.Module:
    """Where a `run_block` pass that only wants `mlp_points` can end (`stop`): the MLP's first input
    projection; with the MLP's statistics too (`stats_hooks` take its input projections' outputs), the
    output projection. (`mlp_points`' residual is the input of a module before the MLP in every family.)"""
    ins, out = family.projections(block)
    return out if statistics else ins[0]


def _calibrate_layers(original, fused, fo, ff, blocks_o, blocks_f, layers, encoded, *, say, device, **fit):
    """The layer-by-layer loop of `calibrate` (models already in float32 and eval mode): `calibrate_pass`
    with both models' blocks, block i of both on `device` while it runs."""
    tr_o, tr_f = trace(original, fo, encoded).to(device), trace(fused, ff, encoded).to(device)

    @contextmanager
    def visit(i):
        with on_device(blocks_o[i], device), on_device(blocks_f[i], device):
            yield blocks_o[i], blocks_f[i]

    report, tokens, _ = calibrate_pass(fo, ff, layers, tr_o, tr_f, visit, fit=fit, say=say)
    return report, tokens


def calibrate_pass(fo: Family, ff: Family, layers: list[int], tr_o, tr_f, visit, *, fit: dict,
                   say: Callable[[str], None], label: str = "calibrating", data_aware: bool = False,
                   build: Callable | None = None, done: Callable | None = None) -> tuple[list[dict], int, int | None]:
    """The layer loop of every calibration: `calibrate` in memory and the block-by-block compress
    (`io.layerwise`). Both models run one block at a time on stored hidden states (`propagate`; traces
    `tr_o`, `tr_f`), every block once, so the cost is linear in depth; up to the first fused layer the
    two models agree and share them. At a fused layer the original block runs once with its MLP's input,
    residual and output hooked (and its MLP input statistics when `data_aware`), the fused block runs on
    its own inputs (not at the first fused layer, where they are the original's), `fit_layer` calibrates
    it, and it runs again, calibrated, to give the next layer its inputs.

    - `visit(i)`: a context manager giving (original block i, fused block i) ready to run, released
      after; the fused block may be None: the original's at a layer not fused, `build`'s at a fused one;
    - `build(i, block_o, metric)`: the fused block i, made from the original's (`metric`: the data
      metric of this run's statistics when `data_aware`, else None);
    - `done(i, block_f)`: called once fused block i is calibrated (the block-by-block compress writes it);
    - `fit`: `fit_layer`'s keyword arguments.

    Returns (the layers' report entries, the calibration's tokens, the statistics' tokens or None)."""
    report: list[dict] = []
    tokens, data_tokens = 0, None
    todo = set(layers)
    h_o = tr_o.hidden
    h_f = h_o  # identical until the first fused layer
    for i in range(max(todo) + 1 if todo else 0):
        with visit(i) as (block_o, block_f):
            if i not in todo:
                next_o, _ = run_block(block_o, tr_o, i, h_o)
                h_f = next_o if h_f is h_o and i < min(todo) else \
                    run_block(block_o if block_f is None else block_f, tr_f, i, h_f)[0]
                h_o = next_o
                continue
            say(f"{label} layer {i} ({layers.index(i) + 1}/{len(layers)})")
            stats, hooks = metric_run(fo, block_o, data_aware)
            # the original's MLP output at its own inputs comes with the run (hooked, not recomputed)
            shared = h_f is h_o  # the first fused layer: both models' inputs, attention included, are the same
            next_o, got_o = run_block(block_o, tr_o, i, h_o, capture=mlp_points(fo, block_o, mlp_input=shared),
                                      capture_output={"y": fo.projections(block_o)[1]}, hooks=hooks)
            h_o = next_o  # (the fused model still holds the old one at the first fused layer)
            metric = stats.metric() if stats is not None else None
            del stats, hooks
            if metric is not None:
                data_tokens = metric.tokens if data_tokens is None else max(data_tokens, metric.tokens)
            if build is not None:
                block_f = build(i, block_o, metric)
            got_f = got_o if shared else run_block(block_f, tr_f, i, h_f, capture=mlp_points(ff, block_f),
                                                   stop=mlp_stop(ff, block_f))[1]  # its inputs only
            report.append(fit_layer(fo, ff, block_o, block_f, i, got_o, got_f, **fit))
            tokens = got_f["x"].shape[0]
            del got_o, got_f, next_o
            if i < max(todo):  # the hidden states after the last calibrated layer are not needed
                h_f = run_block(block_f, tr_f, i, h_f)[0]  # with the calibrated MLP
            if done is not None:
                done(i, block_f)
            del block_f
    return report, tokens, data_tokens


def fit_layer(fo: Family, ff: Family, block_o: nn.Module, block_f: nn.Module, i: int, got_o: dict, got_f: dict, *,
              refit: bool, distill_steps: int, seed: int, ridge: float, distill_lr: float, target: str,
              weighting: str) -> dict:
    """Refit and/or distill fused block `block_f`'s MLP (in place) on what `run_block` captured in the
    original (`got_o`: "r" (or "x" where that is the residual stream), "y") and the fused model
    (`got_f`: "x", "r"; the same dict at the first fused layer) at layer i; returns the layer's report
    entry (see `calibrate`). Takes `got_o`'s tensors over: the target is built in the original's
    output "y" and what the original gave is dropped from `got_o` as soon as it is used."""
    x, r_f = got_f["x"], got_f.get("r", got_f["x"])
    with torch.no_grad():
        if target == "residual":
            y = got_o.pop("y")
            y += got_o.get("r", got_o.get("x")) - r_f  # the same numbers as y + (r_o - r_f), one copy less
            if got_o is not got_f:
                got_o.clear()
        else:  # the original MLP on the fused model's inputs
            y = torch.cat([mlp_apply(fo, block_o, x[s : s + 8192]).float() for s in range(0, x.shape[0], 8192)])
        w = token_weights(y + r_f) if weighting == "token" else None  # y + r_f: the whole residual sum
    ref = float(((w.double()[:, None] if w is not None else 1.0) * y.double().pow(2)).sum().clamp_min(1e-30))
    entry = {"layer": i}
    if refit:  # the exact error before comes with the refit's pass (the normal equations cancel badly near 0)
        before, after, kept = refit_layer(ff, block_f, x, y, ridge=ridge, w=w)
        entry.update(error_before=before / ref, refit_kept=kept, error_after_refit=after / ref)
    else:
        before = after = _sq_error(ff, block_f, x, y, w)
        entry["error_before"] = before / ref
    if distill_steps:
        _, after, kept = distill_layer(ff, block_f, x, y, distill_steps, lr=distill_lr, seed=seed + i, w=w,
                                       before=after)
        entry["distill_kept"] = kept
        entry["error_after_distill"] = after / ref
        if refit and kept:  # W1' moved: the best W2', b2 for it are one more solve away
            prior = after
            _, after, kept = refit_layer(ff, block_f, x, y, ridge=ridge, w=w)
            after = after if kept else prior
            entry["final_refit_kept"] = kept
    entry["error_after"] = after / ref  # each step returns the exact error of what it kept
    return entry
