"""Calibrated compress a block at a time: statistics, allocation, fusion and calibration, never the whole model.

The in-memory calibrated compress loads the model, measures the MLP inputs (`calibrate.data_metrics`),
measures each layer at candidate widths (`allocate`), fuses a copy of the whole model and calibrates
it against the original (`calibrate`): two models in memory. Every one of those steps is layer by
layer already (`propagate`), so here they run one block at a time from the source files (`LazyModel`):

    trace   the embeddings (and whatever else runs outside the blocks) are loaded, in float32, for
            `propagate.trace`, which records every block's arguments; then they are released;
    measure (only with `--allocate`) block by block, the original block runs on the stored hidden
            states; at a fused layer its MLP input statistics give the data metric, the layer is
            reduced at the candidate widths and each candidate's error after refit is measured
            (`allocate.layer_errors`); the widths are then chosen for all layers (`allocate.choose`);
    fuse    block by block again: the original block runs (statistics, MLP input, residual and output
            hooked); at a fused layer the MLP is reduced (`reduce_layers`) at its width, the fused block
            is built from the original's other tensors and the reduction, calibrated (`calibrate.fit_layer`),
            run to give the next fused layer its inputs, and its new MLP tensors are written; both blocks
            are then released.

Every tensor fusion leaves unchanged is copied from the source files first, as the data-free streaming
compress does (`stream.copy_unchanged`). The arithmetic is the in-memory path's own: the same functions,
the same batches in the same order, float32 blocks built from the source dtype as `float32` builds
them, so the output is byte for byte the in-memory path's (tests/test_layerwise.py). Memory: the
calibration activations (the hidden states of both models at one layer boundary, and one layer's
MLP inputs, residuals and outputs at the tokens) plus two blocks and one layer's k-means.

Devices: the trace runs on the CPU (as the in-memory path traces) and then moves to `--device`; every
block is read from the files straight onto it, so the blocks, the activations, the statistics, the
refit and the distillation are all there (`propagate`); the fused tensors come back to be written.

With allocation the k-means of each layer's chosen width runs twice (measure, then fuse) rather than
keeping every candidate reduction of every layer, which would grow with the model.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from ..allocate import Allocation, choose, layer_errors, plan_candidates
from ..calibrate import (DISTILL_LR, RIDGE, batches, calibrate_pass, cast_float32, check_calibration_options,
                         metric_run, mlp_points, mlp_stop, summary)
from ..checks import check_finite, check_tensor_finite
from ..config import FusionConfig
from ..families import family_of
from ..fuse import copy_non_persistent_buffers, reduce_layers, reduction_entries, resolve_device
from ..propagate import as_device, move_tensors, run_block, trace
from .reader import LazyModel, NotStreamable
from .stream import BATCH_INDEPENDENT, StreamPlan, copy_unchanged, finish_config, plan, return_freed_memory
from .writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter


@dataclasses.dataclass
class Calibration:
    """What a calibrated compress is asked to do with its text (see `compress.compress`)."""

    texts: list[str]
    tokenizer: object
    refit: bool = True
    distill_steps: int = 0
    data_aware: bool = True
    allocate: bool = False
    text_name: str = "builtin"  # the card's record of the text: "builtin" or the file's name
    max_length: int = 128
    batch_size: int = 16


class _Blocks:
    """The source's blocks, one at a time, in float32 on `device` and checked for NaN/inf when loaded."""

    def __init__(self, lazy: LazyModel, device: torch.device):
        self.lazy = lazy
        self.device = device
        self.where = str(lazy.source.folder.name)

    def load(self, i: int, device: torch.device | None = None):
        device = self.device if device is None else device
        block = self.lazy.load_block(i, device)  # read straight onto the device
        check_finite(block, self.where, prefix=f"{self.lazy.block_names[i]}.")
        cast_float32(block)
        move_tensors(block, device)  # the buffers that are not in the files (rotary frequencies, ...)
        return block

    def release(self, i: int) -> None:
        self.lazy.release_block(i)
        move_tensors(self.lazy.block(i), "cpu")  # what the files do not hold goes back where it was built
        return_freed_memory()


def _outside_names(lazy: LazyModel) -> list[str]:
    """The tensors outside the blocks that the base model's forward pass uses (not a separate head)."""
    model = lazy.model
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    return [n for n in lazy.outside_blocks() if not prefix or n.startswith(prefix)]


def _trace(lazy: LazyModel, blocks: _Blocks, encoded: list[dict]):
    """`propagate.trace` of the source with only what runs outside the blocks loaded (and block 0,
    which the trace runs once to learn what a block returns), in float32, on the CPU as the in-memory
    path traces; released after, and the trace moved to the blocks' device."""
    names = _outside_names(lazy)
    lazy.load(names)
    state = lazy.model.state_dict()
    for n in names:
        check_tensor_finite(n, state[n], blocks.where)
    del state
    cast_float32(lazy.model)
    blocks.load(0, torch.device("cpu"))
    try:
        tr = trace(lazy.model, lazy.family, encoded, device="cpu")
    finally:
        blocks.release(0)
        lazy.release(names)
    return tr.to(blocks.device)


def measure(lazy: LazyModel, blocks: _Blocks, tr, config: FusionConfig, layers: list[int], data_aware: bool,
            say: Callable[[str], None]) -> Allocation:
    """Allocation a block at a time (see the module docstring): the same errors as `allocate.allocate`."""
    family = lazy.family
    widths = {i: family.read(lazy.block(i)).width for i in layers}  # shapes of the meta tensors
    uniform, budget, cands = plan_candidates(config, widths)
    errors: dict[int, dict[int, float]] = {}
    h = tr.hidden
    for i in range(max(layers) + 1):
        block = blocks.load(i)
        if i not in widths:
            h, _ = run_block(block, tr, i, h)
            blocks.release(i)
            continue
        say(f"measuring layer {i} at {len(cands[i])} widths")
        stats, hooks = metric_run(family, block, data_aware)
        last = i == max(layers)  # the hidden states after it are not needed
        h, got = run_block(block, tr, i, h, capture=mlp_points(family, block), hooks=hooks,
                           stop=mlp_stop(family, block, statistics=stats is not None) if last else None)
        metrics = {i: stats.metric()} if stats is not None else None
        reds = {w: reduce_layers({i: _host_mlp(family, block)}, {i: w}, config, metrics)[i] for w in cands[i]}
        errors[i] = layer_errors(family, block, got, reds, RIDGE)
        del reds, got
        blocks.release(i)
    return Allocation(choose(errors, budget), budget, errors, uniform)


def fuse_and_calibrate(p: StreamPlan, blocks: _Blocks, tr, cal: Calibration, writer: ShardedWriter, *,
                       seed: int, say: Callable[[str], None]) -> tuple[dict[int, tuple], list[dict], int, int | None]:
    """The fuse pass (see the module docstring): `calibrate.calibrate_pass` with the source's blocks read
    one at a time, each fused block built as the pass reaches it; writes every fused layer's MLP tensors.
    Returns (layer -> (inertia, counted), the calibration report, its tokens, the statistics' tokens)."""
    lazy, family = p.lazy, p.lazy.family
    fused_blocks = family_of(p.fused).block_list(p.fused)
    info: dict[int, tuple] = {}

    @contextmanager
    def visit(i):
        block = blocks.load(i)
        try:
            yield block, None  # the fused model's block i is the original's, or `build`'s
        finally:
            blocks.release(i)

    def build(i, block_o, metric):
        metrics = {i: metric} if metric is not None else None
        red = reduce_layers({i: _host_mlp(family, block_o)}, {i: p.new_width[i]}, p.config, metrics)[i]
        info[i] = (None if red.inertia is None else float(red.inertia), red.counts is not None)
        return _fused_block(p, i, block_o, red, fused_blocks[i])

    def done(i, block_f):
        prefix = f"{lazy.block_names[i]}."
        state = block_f.state_dict()
        for key in p.fused_keys[i]:
            value = state[key[len(prefix):]].detach()
            value = value.to(lazy.dtype) if value.is_floating_point() else value  # back to the source's dtype
            value = value.cpu()
            check_tensor_finite(key, value, blocks.where, fused=True)
            writer.write(key, value)

    fit = dict(refit=cal.refit, distill_steps=cal.distill_steps, seed=seed, ridge=RIDGE, distill_lr=DISTILL_LR,
               target="residual", weighting="token")
    report, tokens, data_tokens = calibrate_pass(family, family_of(p.fused), p.layers, tr, tr, visit,
                                                 fit=fit, say=say, label="fusing and calibrating",
                                                 data_aware=cal.data_aware, build=build, done=done)
    return info, report, tokens, data_tokens


def _host_mlp(family, block):
    """The block's MLP tensors on the CPU, where the in-memory path reduces them (its model stays there): the
    data metric's vectors and the pruning scores are sums whose last bits depend on the device, so both
    paths compute them on the CPU; the k-means itself runs on --device in both. (No copy on the CPU.)"""
    return family.read(block).map(lambda t: t.cpu())


def _fused_block(p: StreamPlan, i: int, block_o, red, meta_block):
    """Fused block i, in float32: the original block's other tensors and the reduction's MLP, rounded to
    the source dtype first, as the in-memory path builds the fused model in that dtype and then calibrates
    it in float32."""
    lazy, family = p.lazy, p.lazy.family
    prefix = f"{lazy.block_names[i]}."
    entries = reduction_entries(family, lazy.block_names[i], block_o, red)
    state = {k: v.detach() for k, v in block_o.state_dict().items()}
    for key, value in entries.items():
        state[key[len(prefix):]] = value.to(lazy.dtype).float() if value.is_floating_point() else value
    block = copy.deepcopy(meta_block)
    block.load_state_dict(state, strict=True, assign=True)
    copy_non_persistent_buffers(block_o, block)
    block.eval()
    return block


def check_layerwise(config: FusionConfig) -> None:
    if config.method not in BATCH_INDEPENDENT:
        raise NotStreamable(f"the {config.method} method reduces the layers of one shape together")


def compress_layerwise(source_dir: Path, config: FusionConfig, output: Path, cal: Calibration, *, source: str,
                       lazy: LazyModel, overwrite: bool = False, progress: Callable[[str], None] | None = None,
                       repo_id: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       base_model: str | None = None, seconds: dict | None = None):
    """A calibrated compress a block at a time (see the module docstring); returns a `CompressResult`."""
    from .. import compress as pipeline

    say = progress or (lambda msg: None)
    seconds = seconds if seconds is not None else {}
    check_calibration_options(distill_steps=cal.distill_steps, texts=cal.texts)
    layers = config.resolve_layers(lazy.num_blocks)
    blocks = _Blocks(lazy, as_device(resolve_device(config.device)))
    encoded = list(batches(cal.texts, cal.tokenizer, max_length=cal.max_length, batch_size=cal.batch_size,
                           model=lazy.model, by_length=True))
    t0 = time.perf_counter()
    tr = _trace(lazy, blocks, encoded)
    allocation = None
    if cal.allocate:
        say("measuring each layer at candidate widths (allocation)")
        allocation = measure(lazy, blocks, tr, config, layers, cal.data_aware, say)
        config = dataclasses.replace(config, widths=allocation.widths)
        seconds["allocate"] = time.perf_counter() - t0
    p = plan(source_dir, config, lazy=lazy)
    say(f"calibrating on {len(cal.texts)} samples, a layer at a time")

    def write(tmp: Path) -> None:
        t1 = time.perf_counter()
        writer = ShardedWriter(tmp, p.specs, max_shard_size=max_shard_size, total_parameters=p.fused.num_parameters())
        copy_unchanged(p, writer, say)
        info, report, tokens, data_tokens = fuse_and_calibrate(p, blocks, tr, cal, writer, seed=config.seed, say=say)
        writer.close()
        seconds["fuse+calibrate"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        meta = finish_config(p, info, source=source, data_tokens=data_tokens)
        if allocation is not None:
            meta["allocation"] = allocation.summary()
        if base_model is not None:
            meta["base_model"] = base_model
        meta["calibration"] = summary(len(cal.texts), tokens, report, refit=cal.refit, target="residual",
                                      weighting="token", ridge=RIDGE, distill_steps=cal.distill_steps,
                                      distill_lr=DISTILL_LR)
        meta["calibration"]["text"] = cal.text_name
        pipeline.save_fused(p.fused, tmp, source_dir=source_dir, repo_id=repo_id, weights=False)
        seconds["save"] = time.perf_counter() - t1

    try:
        pipeline.atomic_save(write, output, overwrite=overwrite)
    finally:
        lazy.source.close()
    meta = p.fused.config.mlpfusion
    return pipeline.CompressResult(
        output=output, model=p.fused, source=source,
        widths_before=list(meta["widths_before"]), widths_after=list(meta["widths_after"]),
        layers=list(meta["layers"]), hidden_size=lazy.family.hidden_size(lazy.model.config),
        parameters_before=meta["num_parameters_before"], parameters_after=meta["num_parameters_after"],
        inertia=list(meta["inertia"]), seconds=seconds,
    )


__all__ = ["Calibration", "check_layerwise", "compress_layerwise", "fuse_and_calibrate", "measure"]
