"""Streaming compress: fuse a checkpoint a layer group at a time, never holding the whole model.

    plan    the source model and the fused model on the meta device (LazyModel, `fused_class`): the
            fused config, every output tensor's name, dtype and shape, the shards (ShardedWriter);
    copy    every tensor that fusion does not change goes from the source files to its shard, one
            tensor at a time;
    fuse    the MLPs of one layer group (default: one layer) are loaded, reduced by the same
            `reduce_layers` the in-memory `fuse` uses, written, and released;
    finish  `compress.save_fused(..., weights=False)`, the in-memory path's own save minus the weights:
            config.json & co. by `save_pretrained` itself (`write_model_files`), the tokenizer,
            sentence-transformers files and model card, in the same temporary folder that
            `compress.atomic_save` renames into place at the end.

Peak memory is one layer group's MLPs and their k-means working set, plus the largest single tensor
copied (an embedding matrix). The output is byte for byte the in-memory path's for the same input
and seed: the same writer, and k-means results that do not depend on which layers share a batch
(tests/test_kmeans.py). Methods whose results do depend on the batch (the `sketch` baseline draws
one random matrix for a whole batch) are reduced in the same groups as the in-memory path uses.

`try_streaming(...)` is what `compress()` calls: it streams when it can, and otherwise says why in
one line (logger `hf_mlpfusion`) and returns None so the in-memory path runs. Several processes
(`torchrun`, `accelerate launch`) share the groups; see `distributed`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..checks import check_finite, check_tensor_finite, safetensors_files
from ..config import FusionConfig
from ..core.mlp import MLPTensors
from ..errors import InvalidConfigError, UnsupportedArchitectureError
from ..fuse import (count_parameters, fused_class, fused_config, fused_shape, fusion_metadata, reduce_layers,
                    reduction_entries, resolve_device)
from ..methods import Reduction
from ..modeling.modeling_mlpfusion import get_path
from .distributed import Workers
from .reader import LazyModel, NotStreamable, default_dtype
from .save import UnreadableCheckpoint, weight_specs
from .writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, parse_shard_size

logger = logging.getLogger("hf_mlpfusion")

#: Methods whose result for a layer does not depend on the other layers in its batch (k-means is
#: per problem, pruning per layer), so their layers can be reduced one group at a time. The others
#: are reduced in the in-memory path's groups (every layer of one shape and width at once).
BATCH_INDEPENDENT = ("fusion", "cluster", "prune")
#: Methods whose every step is exact on any device before k-means (casts, concatenation, slicing, counts), so
#: their MLPs are loaded straight onto --device; the others are computed on the CPU, as the in-memory path does.
ON_DEVICE = ("fusion", "cluster")
DEFAULT_LAYERS_PER_GROUP = 1


@dataclasses.dataclass
class StreamPlan:
    """Everything every process knows before any tensor is read (see the module docstring)."""

    lazy: LazyModel
    config: FusionConfig
    layers: list[int]
    widths_before: list[int]
    new_width: dict[int, int]
    groups: list[list[int]]
    fused: torch.nn.Module  # on the meta device
    specs: dict  # name -> TensorSpec of every output tensor, in state-dict order
    fused_keys: dict[int, list[str]]  # layer -> the output tensors its reduction gives
    copy_keys: list[str]  # output tensors taken from the source as they are
    count_layers: list[int]


def _probe_counts(config: FusionConfig) -> bool:
    """Whether the method leaves a count vector (fusion without fold_scale): asked of a 2-neuron MLP."""
    g = torch.Generator().manual_seed(0)
    d = 2
    one = MLPTensors((torch.randn(1, 2, d, generator=g),), (torch.zeros(1, 2),), torch.randn(1, d, 2, generator=g))
    red = reduce_layers({0: one}, {0: 1}, dataclasses.replace(config, device="cpu"))
    return red[0].counts is not None


def plan_groups(layers: list[int], shape_of: dict[int, tuple], method: str, layers_per_group: int) -> list[list[int]]:
    """Layer groups in order: layers of one (shape, width), at most `layers_per_group` each for the methods
    in BATCH_INDEPENDENT, else every layer of that shape and width together (as `reduce_layers` batches them)."""
    by_key: dict[tuple, list[int]] = {}
    for i in layers:
        by_key.setdefault(shape_of[i], []).append(i)
    if method not in BATCH_INDEPENDENT:
        return sorted(by_key.values())
    groups, run, key = [], [], None
    for i in sorted(layers):
        if run and (shape_of[i] != key or len(run) >= layers_per_group):
            groups.append(run)
            run = []
        run.append(i)
        key = shape_of[i]
    return groups + ([run] if run else [])


def plan(source_dir: str | Path, config: FusionConfig, *, layers_per_group: int = DEFAULT_LAYERS_PER_GROUP,
         lazy: LazyModel | None = None) -> StreamPlan:
    """Plan a streaming compress of `source_dir` (opened as `lazy` when given); NotStreamable if its files
    cannot be streamed exactly."""
    if layers_per_group < 1:
        raise InvalidConfigError(f"layers per group must be at least 1, got {layers_per_group}")
    lazy = lazy if lazy is not None else LazyModel(source_dir)
    family, model = lazy.family, lazy.model
    layers = config.resolve_layers(lazy.num_blocks)
    mlps = [family.read(b) for b in family.block_list(model)]  # views of meta tensors: shapes only
    widths_before = [w.width for w in mlps]
    new_width = {i: config.width_for(widths_before[i], i) for i in layers}
    shape_of = {i: (tuple(mlps[i].ins[0].shape[1:]), new_width[i]) for i in layers}
    groups = plan_groups(layers, shape_of, config.method, layers_per_group)

    counted = _probe_counts(config)
    stand_in = {i: Reduction(None, torch.ones(1) if counted else None) for i in layers}
    widths_after, count_layers, stock = fused_shape(widths_before, new_width, stand_in)
    new_config = fused_config(model.config, family, widths_after, count_layers, {}, stock=stock)
    cls = fused_class(lazy.head, stock=stock)
    with torch.device("meta"), default_dtype(lazy.dtype):
        fused = cls(new_config)
    if getattr(model, "generation_config", None) is not None and getattr(fused, "generation_config", None) is not None:
        fused.generation_config = copy.deepcopy(model.generation_config)
    specs = weight_specs(fused)

    fused_keys = {}
    for i in layers:
        prefixes = tuple(f"{lazy.block_names[i]}.{p}." for p in (*family.inputs, family.output, family.activation))
        fused_keys[i] = [k for k in specs if k.startswith(prefixes)]
    changed = {k for keys in fused_keys.values() for k in keys}
    copy_keys = [k for k in specs if k not in changed]
    for k in copy_keys:
        if k not in lazy.file_key or lazy.source.specs[lazy.file_key[k]] != specs[k]:
            raise NotStreamable(f"the fused model's {k} is not the source's tensor of that name")
    return StreamPlan(lazy, config, layers, widths_before, new_width, groups, fused, specs, fused_keys, copy_keys,
                      count_layers)


def reduce_group(p: StreamPlan, group: list[int], device: str) -> tuple[dict[str, torch.Tensor], dict[int, tuple]]:
    """Load one group's MLPs, reduce them, release them: (output tensors on the CPU, layer -> (inertia, counted)).

    The layers are handed to `reduce_layers`, which releases them as soon as it no longer reads them: for
    data-free fusion and cluster, before the clustering (their vectors are all it needs). The output
    biases stay loaded until the end: the fused block keeps them."""
    lazy, family = p.lazy, p.lazy.family
    dev = resolve_device(device)
    config = dataclasses.replace(p.config, device=str(dev))
    names = [n for i in group for path in (*family.inputs, family.output)
             for n in lazy.names_under(f"{lazy.block_names[i]}.{path}")]
    kept = {f"{lazy.block_names[i]}.{family.output}.bias" for i in group}
    loaded_on = dev if p.config.method in ON_DEVICE else torch.device("cpu")
    lazy.load(names, loaded_on)
    try:
        where = str(lazy.source.folder.name)
        for i in group:
            for path in (*family.inputs, family.output):
                check_finite(get_path(lazy.block(i), path), where, prefix=f"{lazy.block_names[i]}.{path}.")
        reduced = reduce_layers({i: family.read(lazy.block(i)) for i in group}, {i: p.new_width[i] for i in group},
                                config, release=lambda: lazy.release([n for n in names if n not in kept]))
        out: dict[str, torch.Tensor] = {}
        info = {}
        for i in group:
            entries = reduction_entries(family, lazy.block_names[i], lazy.block(i), reduced[i], device=loaded_on)
            if sorted(entries) != sorted(p.fused_keys[i]):
                raise UnsupportedArchitectureError(
                    f"internal mismatch in layer {i}: the reduction gives {sorted(entries)[:4]}, the fused model "
                    f"expects {p.fused_keys[i][:4]}; please report this with the model's config.json")
            for k, v in entries.items():
                check_tensor_finite(k, v, where, fused=True)
            out.update({k: v.to("cpu") for k, v in entries.items()})
            red = reduced[i]
            info[i] = (None if red.inertia is None else float(red.inertia), red.counts is not None)
        return out, info
    finally:
        lazy.release(names)


def write_weights(p: StreamPlan, folder: Path, workers: Workers, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                  say: Callable[[str], None] = lambda m: None, device: str = "cpu",
                  seconds: dict | None = None) -> dict[int, tuple]:
    """Process 0: write every output tensor into `folder` (the others run `serve`). Returns layer -> (inertia, counted).

    Every round is one gather (each process's result, or its error) and one broadcast ("go" or "stop"), on
    every process, whatever fails where; process 0 writes a round's results before it says "go"."""
    seconds = seconds if seconds is not None else {}
    writer = ShardedWriter(folder, p.specs, max_shard_size=max_shard_size, total_parameters=p.fused.num_parameters())
    info: dict[int, tuple] = {}
    failed: BaseException | None = None
    W = workers.world_size
    seconds["copy"] = seconds["fuse"] = 0.0
    for r in range(0, len(p.groups), W):
        batch = p.groups[r : r + W]
        mine = None
        try:
            if r == 0:  # the unchanged tensors first, while the other processes cluster their first groups
                t0 = time.perf_counter()
                copy_unchanged(p, writer, say)
                seconds["copy"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            say(f"clustering layer(s) {', '.join(str(i) for g in batch for i in g)} of {len(p.layers)} "
                f"with {p.config.method}" + (f" on {W} processes" if W > 1 else ""))
            mine = reduce_group(p, batch[0], device)
        except Exception as err:  # the others must hear of it, or they wait for ever
            failed = err
        got = workers.gather(("error", _message(failed)) if failed else ("ok", None))[1:] if W > 1 else []
        if failed is None:
            try:
                for status, payload in [("ok", mine)] + list(got):
                    if status == "error":
                        raise RuntimeError(f"another process failed: {payload}")
                    if payload is not None:
                        entries, layer_info = payload
                        for k, v in entries.items():
                            writer.write(k, v)
                        info.update(layer_info)
            except Exception as err:
                failed = err
        del mine, got
        seconds["fuse"] += time.perf_counter() - t0
        if W > 1:
            workers.broadcast("stop" if failed else "go")
        if failed is not None:
            raise failed
    writer.close()
    return info


def copy_unchanged(p: StreamPlan, writer: ShardedWriter, say: Callable[[str], None]) -> None:
    """Every output tensor fusion leaves as it is, from the source files to its shard, one at a time."""
    say(f"copying {len(p.copy_keys)} unchanged tensors")
    for k in p.copy_keys:
        tensor = p.lazy.source.get(p.lazy.file_key[k])
        check_tensor_finite(k, tensor, str(p.lazy.source.folder.name))
        writer.write(k, tensor)


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def serve(p: StreamPlan, workers: Workers, device: str) -> BaseException | None:
    """Processes other than 0: reduce my share of each round and send it to process 0; returns my error, if any."""
    W = workers.world_size
    for r in range(0, len(p.groups), W):
        batch = p.groups[r : r + W]
        mine, err = None, None
        if workers.rank < len(batch):
            try:
                mine = reduce_group(p, batch[workers.rank], device)
            except Exception as e:
                err = e
        workers.gather(("error", _message(err)) if err else ("ok", mine))
        del mine
        if workers.broadcast(None) == "stop":
            return err
    return None


def finish_config(p: StreamPlan, info: dict[int, tuple], *, source: str, data_tokens: int | None = None) -> dict:
    """The fused model's `mlpfusion` metadata, set on the meta model's config (as `fuse` sets it)."""
    counted = [i for i in p.layers if info[i][1]]
    if counted != p.count_layers:
        raise UnsupportedArchitectureError(f"internal mismatch: count vectors on layers {counted}, planned on "
                                           f"{p.count_layers}; please report this")
    widths_after = [p.new_width.get(i, w) for i, w in enumerate(p.widths_before)]
    reduced = {i: Reduction(None, None, info[i][0]) for i in p.layers}
    meta = fusion_metadata(p.config, p.layers, p.widths_before, widths_after, reduced, source=source,
                           num_parameters_before=count_parameters(p.lazy.model), data_tokens=data_tokens)
    meta["num_parameters_after"] = count_parameters(p.fused)
    p.fused.config.mlpfusion = meta
    return meta


#: glibc's mallopt parameter number for the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 64 << 10


def _glibc():
    """The C library when it is glibc (whose allocator the two functions below tune), else None."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_freed_memory_early() -> bool:
    """On glibc, serve every allocation of 64 KiB or more by its own mmap, so that freeing it returns the pages.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), and
    later blocks below it come from the heap, whose freed pages it keeps: one layer's temporaries then stay
    resident into the next layer's k-means. With a fixed threshold the Llama-shaped streaming compress
    peaked at 0.92 GB instead of 1.05 GB (docs/scale.md). Elsewhere (musl, macOS, Windows) this does
    nothing. Returns whether it was set."""
    libc = _glibc()
    try:
        return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except AttributeError:
        return False


#: Weights from which a calibrated compress fixes the mmap threshold too (`fix_mmap_threshold_for`)
LARGE_CHECKPOINT_BYTES = 1 << 30


def fix_mmap_threshold_for(source_dir: Path | None, *, calibrated: bool) -> bool:
    """`release_freed_memory_early` where it pays: a data-free compress, or a calibrated one of a checkpoint of
    at least `LARGE_CHECKPOINT_BYTES` of safetensors weights (block by block). On the 3 GB Llama shape the
    calibrated peak fell from 2.73 to 2.11 GB with it at no cost in time (227 s against 224 s); on MiniLM
    (90 MB) it made calibration 1.5-1.8x slower, so small checkpoints keep glibc's dynamic threshold and
    `return_freed_memory` after each block (docs/scale.md). Returns whether it was set."""
    if calibrated:
        files = [] if source_dir is None else safetensors_files(Path(source_dir))  # the index's shards, if any
        if sum(f.stat().st_size for f in files) < LARGE_CHECKPOINT_BYTES:
            return False
    return release_freed_memory_early()


def return_freed_memory() -> None:
    """On glibc, give the pages of freed heap memory back to the system now (`malloc_trim`); elsewhere nothing.

    The block-by-block calibration calls it after each block: it keeps the resident size at what is live
    (0.73 GB over 12 Llama-shaped blocks, against 1.0 -> 2.0 GB without) at none of the cost of a fixed
    mmap threshold, which doubled calibration time on MiniLM (17-20 s -> 33-36 s) by mapping and
    faulting in every large temporary afresh (large checkpoints get both: `fix_mmap_threshold_for`)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def compress_streaming(p: StreamPlan, source_dir: Path, output: Path, *, source: str, overwrite: bool = False,
                       progress: Callable[[str], None] | None = None, repo_id: str | None = None,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, workers: Workers | None = None,
                       seconds: dict | None = None, base_model: str | None = None):
    """Run a planned streaming compress; every process returns the same `CompressResult`."""
    from .. import compress as pipeline  # (looked up when called, as the in-memory path's save_fused is)

    say = progress or (lambda msg: None)
    release_freed_memory_early()
    workers = workers or Workers()
    seconds = seconds if seconds is not None else {}
    device = workers.device(p.config.device)

    def write(tmp: Path) -> None:
        info = write_weights(p, tmp, workers, max_shard_size=max_shard_size, say=say, device=device, seconds=seconds)
        t0 = time.perf_counter()
        finish_config(p, info, source=source)
        if base_model is not None:
            p.fused.config.mlpfusion["base_model"] = base_model
        pipeline.save_fused(p.fused, tmp, source_dir=source_dir, repo_id=repo_id, weights=False)
        seconds["save"] = time.perf_counter() - t0

    try:
        if workers.main:
            try:
                pipeline.atomic_save(write, output, overwrite=overwrite)
            except BaseException as err:
                workers.broadcast(("error", _message(err)))
                raise
            meta = workers.broadcast(("ok", p.fused.config.mlpfusion))[1]
        else:
            mine = serve(p, workers, device)
            status, meta = workers.broadcast(None)
            if mine is not None:
                raise mine
            if status == "error":
                raise RuntimeError(f"process 0 failed: {meta}")
            p.fused.config.mlpfusion = meta
    finally:
        p.lazy.source.close()
    return pipeline.CompressResult(
        output=output, model=p.fused, source=source,
        widths_before=list(meta["widths_before"]), widths_after=list(meta["widths_after"]),
        layers=list(meta["layers"]), hidden_size=p.lazy.family.hidden_size(p.lazy.model.config),
        parameters_before=meta["num_parameters_before"], parameters_after=meta["num_parameters_after"],
        inertia=list(meta["inertia"]), seconds=seconds,
    )


def try_streaming(source_dir: str | Path, config: FusionConfig, output: str | Path, *, streaming: bool | None = None,
                  data_free: bool = True, source: str, overwrite: bool = False,
                  progress: Callable[[str], None] | None = None, repo_id: str | None = None,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  layers_per_group: int = DEFAULT_LAYERS_PER_GROUP, base_model: str | None = None,
                  calibration=None):
    """`compress()`'s streaming branch: a `CompressResult` when it streamed, None when the in-memory path must run.

    `streaming=None` (default) streams whenever it can (the files are exactly what the model loads) and
    otherwise logs one line saying why; `True` insists (an error instead of the in-memory path); `False`
    never streams. Under several processes streaming is the only path. A compress that is not
    `data_free` streams a block at a time with its `calibration` (`layerwise.Calibration`), in one process.
    """
    from .layerwise import check_layerwise, compress_layerwise

    parse_shard_size(max_shard_size)  # a bad size or device fails now, not after the copying
    resolve_device(config.device)
    workers = Workers.from_env()
    try:
        reason = None
        t0 = time.perf_counter()
        if streaming is False:
            reason = "--in-memory was asked for"
        elif not data_free and calibration is None:
            reason = "calibration and data-aware clustering need the calibration text"
        elif not data_free and workers.world_size > 1:
            reason = "calibration runs block after block, in one process"
        else:
            try:
                if data_free:
                    p = plan(source_dir, config, layers_per_group=layers_per_group)
                else:
                    check_layerwise(config)
                    lazy = LazyModel(source_dir)
            except UnreadableCheckpoint:
                return None  # the loader says what is wrong with the file, in its own words
            except NotStreamable as err:
                reason = str(err)
        if reason is not None:
            if streaming or workers.world_size > 1:
                why = "several processes share only a streaming compress" if workers.world_size > 1 else "--streaming"
                raise InvalidConfigError(f"cannot stream this compress ({why}): {reason}")
            if streaming is None:
                logger.warning(f"note: compressing in memory, not streaming: {reason}")
            return None
        seconds = {"load": time.perf_counter() - t0}
        if not data_free:
            return compress_layerwise(Path(source_dir), config, Path(output), calibration, source=source, lazy=lazy,
                                      overwrite=overwrite, progress=progress, repo_id=repo_id,
                                      max_shard_size=max_shard_size, base_model=base_model, seconds=seconds)
        return compress_streaming(p, Path(source_dir), Path(output), source=source, overwrite=overwrite,
                                  progress=progress, repo_id=repo_id, max_shard_size=max_shard_size,
                                  workers=workers, seconds=seconds, base_model=base_model)
    finally:
        workers.close()


__all__ = ["BATCH_INDEPENDENT", "ON_DEVICE", "StreamPlan", "compress_streaming", "plan", "plan_groups",
           "reduce_group", "try_streaming", "write_weights"]
