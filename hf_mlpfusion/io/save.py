"""Save a model as `save_pretrained` does, with the weights going through `ShardedWriter`.

`write_pretrained(model, folder)` is the in-memory path's save; the streaming path uses the same
two halves on a model that lives on the meta device:

- `weight_specs(model)`: the tensors `save_pretrained` would write (the state dict without the keys
  to ignore on save and without tied weights), as name -> dtype and shape, in state-dict order;
- `write_model_files(model, folder)`: everything else `save_pretrained` writes (config.json,
  generation_config.json, and a fused class's remote-code bundle), by `save_pretrained` itself,
  run with an empty state dict in a scratch folder whose weight files are dropped.

So both paths write the same bytes, and the bytes are `save_pretrained`'s
(tests/test_streaming.py checks both claims for every model type).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .safetensors_format import TensorSpec
from .writer import DEFAULT_MAX_SHARD_SIZE, INDEX_NAME, WEIGHTS_NAME, ShardedWriter


class NotStreamable(Exception):
    """The checkpoint cannot be written tensor by tensor exactly as the in-memory path would; the message says why."""


class UnreadableCheckpoint(NotStreamable):
    """No weights this reader can use (none, only pickles, a truncated or malformed file or index, no
    readable config.json): the in-memory loader's own checks report it, in their words, or load the pickles."""


def _saved_state(model) -> dict[str, torch.Tensor]:
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings renames nothing on save
        return state
    reverted = revert_weight_conversion(model, state)
    if list(reverted) != list(state):
        raise NotStreamable(f"transformers renames {type(model).__name__}'s weights when saving")
    return state


def weight_specs(model) -> dict[str, TensorSpec]:
    """Name -> dtype and shape of every tensor `save_pretrained` writes for `model` (meta or real)."""
    return {name: TensorSpec.of(t) for name, t in _saved_state(model).items()}


def write_model_files(model, folder: str | os.PathLike) -> list[str]:
    """Write what `model.save_pretrained(folder)` writes besides the weights; returns the paths written."""
    folder = Path(folder)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".config-") as scratch:
        hf_logging.disable_progress_bar()  # "Writing model shards: 0it" is noise here
        try:
            model.save_pretrained(scratch, state_dict={})
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        written = []
        for path in sorted(Path(scratch).rglob("*")):
            rel = path.relative_to(scratch)
            if path.is_dir() or rel.name in (WEIGHTS_NAME, INDEX_NAME):
                continue
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), folder / rel)
            written.append(rel.as_posix())
    return written


def write_pretrained(model, folder: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """`model.save_pretrained(folder, max_shard_size=...)`, with the weights written by `ShardedWriter`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        state = _saved_state(model)
    except NotStreamable:
        model.save_pretrained(str(folder), max_shard_size=max_shard_size)
        return
    with ShardedWriter(folder, {k: TensorSpec.of(v) for k, v in state.items()}, max_shard_size=max_shard_size,
                       total_parameters=model.num_parameters()) as writer:
        for name in list(state):
            writer.write(name, state.pop(name))
    write_model_files(model, folder)


__all__ = ["NotStreamable", "UnreadableCheckpoint", "weight_specs", "write_model_files", "write_pretrained"]
