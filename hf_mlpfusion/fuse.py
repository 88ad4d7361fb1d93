"""`fuse(model, FusionConfig(...))`: one verb over an in-memory model (no files involved).

plan (which layers, which widths) -> read every selected MLP through the model's family -> reduce
all layers of one shape in one batched call of the method -> build the fused model (the generic
fused classes with per-layer widths and frozen count modules, or the stock class when the result
has one width and no count vector). The input model is not modified: the result is a new model
that owns copies of the weights.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable

import torch
from transformers import PreTrainedModel

from . import __version__, modeling
from .config import FusionConfig
from .core.metric import DataMetric, stack_metrics
from .core.mlp import MLPTensors, scale_output, stack
from .errors import InvalidConfigError, UnsupportedArchitectureError
from .families import Family, family_for, fused_model_type, head_name, stock_type
from .hub import source_identity
from .methods import DATA_AWARE_METHODS, METHODS, Reduction, vector_input

Progress = Callable[[str], None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidConfigError(f"bad device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # mps, meta, xla...: the k-means and the model stay on cpu/cuda
        raise InvalidConfigError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("device 'cuda' asked for but CUDA is not available: use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidConfigError(
            f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return dev


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reduce_layers(weights: dict[int, MLPTensors], widths: dict[int, int], config: FusionConfig,
                  metrics: dict[int, DataMetric] | None = None, *,
                  release: Callable[[], None] | None = None) -> dict[int, Reduction]:
    """Reduce every selected MLP; layers of the same shape and new width go through one batched call.

    With `release`, the layers are handed over: each entry is taken out of `weights` once it is no longer
    read, and `release()` is called when `weights` is empty (there the caller frees the layers' memory).
    For a method that reduces from the sub-MLP vectors (`Method.reduce_vectors`) without a data metric
    that is before the clustering, so one layer's weights and its vectors are never held during it."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in weights:  # (no loop variable holding a layer: see `release`)
        groups[(tuple(weights[i].ins[0].shape[1:]), widths[i])].append(i)
    method = METHODS[config.method]
    device = resolve_device(config.device)
    from_vectors = method.reduce_vectors if release is not None and metrics is None else None
    out: dict[int, Reduction] = {}
    for (_, k), idx in sorted(groups.items()):
        # stacked in the weights' dtype, then cast once: the same numbers as casting each layer, fewer copies
        # (none at all for one float32 layer: the methods never write into their input). Methods that
        # take any dtype get no float32 copy of the layers at all: they cast into their own buffers.
        parts = [weights[i].map(lambda t: t.detach()) for i in idx]
        mlps = parts[0] if len(parts) == 1 else stack(parts)
        del parts
        kwargs = dict(config.extra)
        if from_vectors is not None:  # what the method's reduce does first, here, so the layers can go
            z, like = vector_input(mlps)
            del mlps
            _hand_over(weights, idx, release)
            red = from_vectors(z, like, k, seed=config.seed, device=device, kmeans_options=config.kmeans_options(),
                               **kwargs)
            del z
        else:
            if not method.any_dtype:
                mlps = mlps.map(lambda t: t.float())
            if metrics is not None:
                kwargs["metric"] = stack_metrics([metrics[i] for i in idx])
            red = method.reduce(mlps, k, seed=config.seed, device=device, kmeans_options=config.kmeans_options(),
                                **kwargs)
            del mlps
            if release is not None:
                _hand_over(weights, idx, release)
        if config.fold_scale and red.counts is not None:
            red = Reduction(scale_output(red.mlps, red.counts), None, red.inertia, red.labels)
        for j, i in enumerate(idx):
            out[i] = Reduction(
                red.mlps.map(lambda t, j=j: t[j : j + 1]),
                None if red.counts is None else red.counts[j],
                None if red.inertia is None else red.inertia[j],
                None if red.labels is None else red.labels[j],
            )
    return out


def _hand_over(weights: dict[int, MLPTensors], idx: list[int], release: Callable[[], None]) -> None:
    for i in idx:
        del weights[i]
    if not weights:
        release()


def check_data_aware_method(method: str) -> None:
    """Data-aware clustering needs a method that clusters."""
    if method not in DATA_AWARE_METHODS:
        raise InvalidConfigError(
            f"data-aware clustering applies to {' and '.join(DATA_AWARE_METHODS)}, not {method!r}: "
            "drop it (--data-aware) or choose one of those methods"
        )


def fuse(model: PreTrainedModel, config: FusionConfig | None = None, *, source: str | None = None,
         metrics: dict[int, DataMetric] | None = None, progress: Progress | None = None,
         precomputed: dict[tuple[int, int], Reduction] | None = None) -> PreTrainedModel:
    """Return a fused copy of `model` (the input is left untouched).

    `source` is recorded in the metadata as the source model (defaults to the model's name_or_path): a
    local folder by its folder name, a Hub id as itself and as `base_model` (see `hub.source_identity`).
    `metrics` (layer -> `DataMetric`, from `hf_mlpfusion.calibrate.data_metrics`) makes the
    clustering data-aware; only the clustering methods (fusion, cluster) take it.
    `precomputed` ((layer, width) -> `Reduction`, e.g. `allocate(...).reductions`) are reductions made
    with this config already; they are used instead of reducing those layers again.
    """
    config = config or FusionConfig()
    say = progress or (lambda msg: None)
    model_type = getattr(model.config, "model_type", None)
    family = family_for(model_type, fused_ok=False)
    stock_head = type(model).__name__
    head_name(model_type, [stock_head])  # raises with the list of supported heads
    num_layers = family.num_layers(model.config)
    layers = config.resolve_layers(num_layers)
    blocks = family.block_list(model)
    mlps = [family.read(b) for b in blocks]
    widths_before = [w.width for w in mlps]
    weights = {i: mlps[i] for i in layers}
    new_width = {i: config.width_for(weights[i].width, i) for i in layers}
    if metrics is not None:
        check_data_aware_method(config.method)
        missing = [i for i in layers if i not in metrics]
        if missing:
            raise InvalidConfigError(f"data-aware clustering has no statistics for layer(s) {missing}: "
                                     "compute them for every fused layer")

    say(f"clustering {len(layers)} layer(s) with {config.method}")
    ready = {i: precomputed[(i, new_width[i])] for i in layers if precomputed and (i, new_width[i]) in precomputed}
    todo = [i for i in layers if i not in ready]
    reduced = {**reduce_layers({i: weights[i] for i in todo}, {i: new_width[i] for i in todo}, config, metrics), **ready}

    widths_after, count_layers, stock = fused_shape(widths_before, new_width, reduced)
    meta = fusion_metadata(config, layers, widths_before, widths_after, reduced,
                           source=source if source is not None else str(getattr(model.config, "_name_or_path", "") or ""),
                           num_parameters_before=count_parameters(model),
                           data_tokens=None if metrics is None else max(m.tokens for m in metrics.values()))

    say("building the fused model")
    fused = build_fused(model, family, {i: r for i, r in reduced.items()}, widths_after, count_layers, meta,
                        stock=stock)
    meta["num_parameters_after"] = count_parameters(fused)
    fused.config.mlpfusion = meta
    return fused


def fused_shape(widths_before: list[int], new_width: dict[int, int],
                reduced: dict[int, Reduction]) -> tuple[list[int], list[int], bool]:
    """(every layer's width after fusion, the layers with a count vector, whether the result is a stock model:
    one width everywhere and no count vector)."""
    widths_after = [new_width.get(i, w) for i, w in enumerate(widths_before)]
    count_layers = [i for i in sorted(reduced) if reduced[i].counts is not None]
    return widths_after, count_layers, not count_layers and len(set(widths_after)) == 1


def fusion_metadata(config: FusionConfig, layers: list[int], widths_before: list[int], widths_after: list[int],
                    reduced: dict[int, Reduction], *, source: str, num_parameters_before: int,
                    data_tokens: int | None = None) -> dict:
    """The `mlpfusion` entry of the fused config.json (`num_parameters_after` is added once the model is built);
    `data_tokens`: the number of tokens data-aware clustering measured its statistics on (None: data-free)."""
    # a local folder by its name only (no absolute path in the output); a Hub id is also the base model
    source_model, base_model = source_identity(source)
    meta = {
        "method": config.method,
        "ratio": config.ratio,
        "intermediate_size": config.intermediate_size,
        "layers": layers,
        "seed": config.seed,
        "fold_scale": config.fold_scale,
        "width_multiple": config.width_multiple,
        "kmeans": _resolved_kmeans_options(config) if config.method in DATA_AWARE_METHODS else None,
        "clustering": (("data-aware" if data_tokens is not None else "data-free")
                       if config.method in DATA_AWARE_METHODS else None),
        "source_model": source_model,
        "base_model": base_model,
        "library_version": __version__,
        "widths_before": widths_before,
        "widths_after": widths_after,
        "num_parameters_before": num_parameters_before,
        "inertia": [None if reduced[i].inertia is None else float(reduced[i].inertia) for i in layers],
    }
    if data_tokens is not None:
        meta["clustering_tokens"] = int(data_tokens)
    if config.extra:
        meta["options"] = {k: v for k, v in config.extra.items() if isinstance(v, (int, float, str, bool))}
    return meta


def fused_class(stock_head: str, *, stock: bool) -> type:
    """The class of the fused model: the stock head itself, or its fused class (per-layer widths, counts)."""
    import transformers

    return getattr(transformers, stock_head) if stock else modeling.model_class_for(stock_head)


def fused_config(model, family: Family, widths_after: list[int], count_layers: list[int],
                 meta: dict, *, stock: bool):
    """The config of the fused model: the stock one at one width, or the fused type with per-layer widths.

    `model` is the source model or just its config (the streaming path has no loaded model)."""
    source_config = getattr(model, "config", model)
    base = source_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
                "intermediate_sizes", "count_layers", "mlpfusion", "mlp_layout"):
        base.pop(key, None)
    base.update(family.stock_width_update(max(widths_after)))
    if stock:
        new_config = type(source_config)(**base)
    else:
        cfg_cls = modeling.config_class_for(stock_type(source_config.model_type))
        new_config = cfg_cls(**base, intermediate_sizes=widths_after, count_layers=count_layers,
                             mlp_layout=family.layout())
    new_config.mlpfusion = meta
    return new_config


def build_fused(model: PreTrainedModel, family: Family, reduced: dict[int, Reduction], widths_after: list[int],
                count_layers: list[int], meta: dict, *, stock: bool) -> PreTrainedModel:
    new_config = fused_config(model, family, widths_after, count_layers, meta, stock=stock)
    cls = type(model) if stock else fused_class(type(model).__name__, stock=False)
    state = _fused_state_dict(model, family, reduced)
    with torch.device("meta"):
        fused = cls(new_config)
    result = fused.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or result.missing_keys:
        raise UnsupportedArchitectureError(
            f"internal mismatch while building {cls.__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; please report this with the model's config.json"
        )
    copy_non_persistent_buffers(model, fused)
    fused.tie_weights()
    _check_materialised(fused)
    if getattr(model, "generation_config", None) is not None and getattr(fused, "generation_config", None) is not None:
        fused.generation_config = copy.deepcopy(model.generation_config)
    fused.train(model.training)
    return fused


def _resolved_kmeans_options(config: FusionConfig) -> dict:
    from .core import kmeans as km

    opts = config.kmeans_options()
    return {
        "n_init": opts["n_init"] if opts["n_init"] is not None else km.DEFAULT_N_INIT,
        "max_iter": opts["max_iter"] if opts["max_iter"] is not None else km.DEFAULT_MAX_ITER,
        "tol": opts["tol"] if opts["tol"] is not None else km.DEFAULT_TOL,
        "refine": "hartigan",
    }


def reduction_entries(family: Family, block_name: str, block: torch.nn.Module, red: Reduction, *,
                      device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The state-dict entries of one fused block's new MLP, in the dtype and on the device of its weights
    (on `device` when they are no longer loaded: released, they keep their dtype on the meta device).
    Reads no weight of the block's MLP but its output bias."""
    weight = family.projections(block)[0][0].weight
    dtype, dev = weight.dtype, weight.device if device is None else device
    mlp = red.mlps.map(lambda t: t.to(dev, dtype))
    counts = None if red.counts is None else red.counts.to(dev, dtype)
    return family.state_entries(block_name, block, mlp, counts, family.output_bias(block))


def _fused_state_dict(model, family: Family, reduced: dict[int, Reduction]) -> dict[str, torch.Tensor]:
    names = {id(m): name for name, m in model.named_modules()}
    blocks = family.block_list(model)
    replaced: dict[str, torch.Tensor] = {}
    for i, red in reduced.items():
        replaced.update(reduction_entries(family, names[id(blocks[i])], blocks[i], red))
    state = {}
    for key, value in model.state_dict().items():
        state[key] = replaced[key] if key in replaced else value.detach().clone()
    for key, value in replaced.items():
        state.setdefault(key, value)
    return state


def copy_non_persistent_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """The buffers `dst` (built on the meta device) still has on the meta device, from `src` (buffers outside
    the state dict, which loading it does not fill)."""
    dst_modules = dict(dst.named_modules())
    for name, buf in src.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        target = dst_modules.get(mod_name)
        if target is not None and target._buffers.get(leaf) is not None and target._buffers[leaf].is_meta:
            target._buffers[leaf] = buf.detach().clone()


def _check_materialised(model: torch.nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UnsupportedArchitectureError(
            f"internal error: {len(left)} tensors were not filled ({left[:3]}); please report this"
        )


__all__ = ["fuse", "fused_class", "fused_config", "fused_model_type", "fused_shape", "fusion_metadata", "reduce_layers",
           "reduction_entries", "resolve_device"]
