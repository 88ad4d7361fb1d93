"""Checks of a source checkpoint, so that a damaged one stops the run with one line naming the tensor
instead of being fused into silent garbage.

- `read_headers(files)`: every safetensors file is whole (header and data length), and for a sharded
  checkpoint every shard its `model.safetensors.index.json` names is there and holds its tensors.
  Returns {tensor name: shape}; reading headers touches no weights.
- `check_against_config(...)`: before loading, the tensors in the files against the state dict of
  the model class built from config.json on the meta device (no memory): a tensor of the wrong
  shape, or one the model needs that no file has, stops the run here. Tied weights (an LM head
  sharing the input embedding) and non-persistent buffers are legitimately absent. Names that
  transformers renames on load (legacy `gamma`/`beta`, a missing base-model prefix) are left to:
- `check_loading_info(...)`: after loading, transformers' own report (`output_loading_info=True`,
  which applies its renames): any missing, unexpected or mis-shaped tensor stops the run.
- `check_finite(model)`: no NaN or infinite value in any floating-point tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import CorruptCheckpointError

INDEX = "model.safetensors.index.json"


def _short(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [err.__class__.__name__])[0][:160]


def read_headers(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} over safetensors `files`, each checked to be whole."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for f in files:
        try:  # safetensors checks the header and that the data section matches the file's length
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key in where:
                        raise CorruptCheckpointError(
                            f"tensor {key} is in both {where[key].name} and {f.name}: remove the stray file or re-download"
                        )
                    where[key] = f
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except CorruptCheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CorruptCheckpointError(f"{f} is corrupt or truncated ({_short(err)}): download it again") from None
    return shapes


def safetensors_files(folder: Path) -> list[Path]:
    """The weights files to read: the shards an index names (each must exist), else every
    *.safetensors file of the folder."""
    index = folder / INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(f"{index} is not a valid shard index ({_short(err)}): re-download it") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"shard {missing[0]} listed in {INDEX} is missing from {folder}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": download it again"
        )
    return [folder / s for s in shards]


def check_index(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the index lists is in the shards (the index and the files agree)."""
    index = folder / INDEX
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    absent = sorted(k for k in weight_map if k not in shapes)
    if absent:
        raise CorruptCheckpointError(
            f"tensor {absent[0]} is listed in {INDEX} but is in no shard of {folder}"
            + (f" ({len(absent)} such tensors)" if len(absent) > 1 else "") + ": re-download the checkpoint"
        )


def _matches(patterns, key: str) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def expected_tensors(cls, config) -> tuple[dict[str, tuple[int, ...]], set[str], object]:
    """(state dict shapes, keys that may be absent, the meta model) of `cls` built from `config`
    on the meta device: no weights are allocated."""
    with torch.device("meta"):
        model = cls(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    ignore = getattr(model, "_keys_to_ignore_on_load_missing", None)
    optional |= {k for k in shapes if _matches(ignore, k)}
    return shapes, optional, model


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def check_against_config(folder: Path, header: dict[str, tuple[int, ...]], cls, config) -> None:
    """Before loading: tensors of the wrong shape, or needed and in no file, stop the run."""
    if getattr(config, "quantization_config", None):
        return  # packed shapes of quantised weights: left to transformers
    expected, optional, model = expected_tensors(cls, config)
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: set[str] = set()
    unexplained = []
    for key, shape in header.items():
        target = key if key in expected else None
        if target is None and prefix and f"{prefix}.{key}" in expected:
            target = f"{prefix}.{key}"
        if target is None and prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            target = key[len(prefix) + 1:]
        if target is None:
            unexplained.append(key)
            continue
        found.add(target)
        if tuple(shape) != expected[target]:
            raise CorruptCheckpointError(
                f"tensor {key} in {folder} has shape {list(shape)} but its config.json asks for "
                f"{list(expected[target])}: the weights and config.json do not match; re-download or fix config.json"
            )
    missing = sorted(k for k in expected if k not in found and k not in optional)
    if missing and not unexplained:  # with unexplained names, transformers may rename them on load: see after
        raise CorruptCheckpointError(
            f"tensor {missing[0]} is missing from {folder}"
            + (f" ({_plural(len(missing), 'tensor')} missing)" if len(missing) > 1 else "")
            + f": its config.json ({cls.__name__}) needs it; the download is incomplete or config.json belongs to "
            "another model; re-download it or fix config.json"
        )


def check_loading_info(folder: Path, info: dict, model) -> None:
    """After loading: transformers' report of missing, unexpected and mis-shaped tensors."""
    name = type(model).__name__
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, ckpt, want = (list(mismatched[0]) + [None, None])[:3]
        shapes = f" has shape {list(ckpt)} but its config.json asks for {list(want)}" if want is not None else " has the wrong shape"
        raise CorruptCheckpointError(
            f"tensor {key} in {folder}{shapes}: the weights and config.json do not match; re-download or fix config.json"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CorruptCheckpointError(
            f"tensor {missing[0]} is missing from {folder}"
            + (f" ({_plural(len(missing), 'tensor')} missing)" if len(missing) > 1 else "")
            + f": its config.json ({name}) needs it, and loading would fill it with random values; "
            "re-download the checkpoint or fix config.json"
        )
    buffers = {n for n, _ in model.named_buffers()}
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if k not in buffers)
    if unexpected:
        raise CorruptCheckpointError(
            f"tensor {unexpected[0]} in {folder} is not part of {name}"
            + (f" ({_plural(len(unexpected), 'unexpected tensor')})" if len(unexpected) > 1 else "")
            + ": the weights belong to another architecture or config.json is wrong; fix config.json or re-download"
        )
    errors = info.get("error_msgs") or []
    if errors:
        raise CorruptCheckpointError(f"could not load {folder}: {_short(Exception(errors[0]))}")


def nonfinite(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    """How many NaN or infinite values `tensor` holds (in chunks: no full-size temporary)."""
    if not tensor.is_floating_point() or tensor.is_meta:
        return 0
    flat = tensor.detach().reshape(-1)
    return int(sum(int((~torch.isfinite(part)).sum()) for part in flat.split(chunk)))


def check_tensor_finite(key: str, tensor: torch.Tensor, where: str, *, fused: bool = False) -> None:
    """One tensor is finite; else one line naming it (`fused`: it came out of fusion, not the source)."""
    bad = nonfinite(tensor)
    if not bad:
        return
    kinds = "NaN" if torch.isnan(tensor).any() else "infinite"
    if fused:
        raise CorruptCheckpointError(
            f"fusing {where} gave {bad} {kinds} value(s) in {key}: the source weights overflow in their "
            "dtype; nothing was written"
        )
    raise CorruptCheckpointError(
        f"tensor {key} in {where} holds {bad} {kinds} value(s) of {tensor.numel()}: the checkpoint is damaged "
        "(or was saved from a diverged training run); fusing it would give garbage. Re-download or fix it"
    )


def check_finite(model, where: str, *, fused: bool = False, prefix: str = "") -> None:
    """Every floating-point tensor of `model` is finite; else one line naming the first bad one (its
    state-dict key after `prefix`, for a submodule)."""
    for key, tensor in model.state_dict().items():
        check_tensor_finite(prefix + key, tensor, where, fused=fused)


__all__ = ["check_against_config", "check_finite", "check_tensor_finite", "check_index", "check_loading_info", "expected_tensors",
           "nonfinite", "read_headers", "safetensors_files"]
