"""Write a checkpoint's weights shard by shard, a tensor at a time, in transformers' layout.

`ShardedWriter(folder, specs, max_shard_size=...)` is given every tensor's name, dtype and shape up
front (in state-dict order). It splits them into shards the way `save_pretrained` does
(`huggingface_hub.split_state_dict_into_shards_factory`: in order, a new shard when the next tensor
would pass `max_shard_size`), names them `model.safetensors` or `model-0000i-of-0000n.safetensors`,
and writes each file's header at once (see `safetensors_format`). `write(name, tensor)` then puts a
tensor's bytes at its offset, in any order, so nothing but the tensor being written is held in
memory; `close()` checks every tensor arrived and writes `model.safetensors.index.json` when there
are several shards. The files are byte for byte what `save_pretrained` writes for the same tensors.

Both `compress` paths write weights through this one writer: the in-memory path
(`write_pretrained(model, folder)`) and the streaming one, which is why they give identical bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.serialization._base import parse_size_to_int

from ..errors import InvalidConfigError
from .safetensors_format import Layout, TensorSpec, header, tensor_bytes

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FILENAME_PATTERN = "model{suffix}.safetensors"
#: Default shard size of `mlpfusion compress` (transformers 4's default; 5's `save_pretrained` uses 50GB).
DEFAULT_MAX_SHARD_SIZE = "5GB"
METADATA = {"format": "pt"}  # what save_pretrained puts in every shard's header


def parse_shard_size(size: int | str) -> int:
    """'5GB', '500MB', '10KB' or a number of bytes -> bytes (the units huggingface_hub accepts: 1GB = 10^9)."""
    if isinstance(size, bool):
        raise InvalidConfigError(f"bad shard size {size!r}: use a size such as 5GB or 500MB")
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip()
        try:
            value = int(text) if text.isdigit() else parse_size_to_int(text)
        except ValueError:
            raise InvalidConfigError(f"bad shard size {size!r}: use a size such as 5GB, 500MB or 100KB") from None
    if value < 1:
        raise InvalidConfigError(f"shard size {size!r} is not positive: use a size such as 5GB")
    return value


class ShardedWriter:
    """See the module docstring. Use as a context manager, or call `close()` when every tensor is written."""

    def __init__(self, folder: str | os.PathLike, specs: dict[str, TensorSpec], *,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, total_parameters: int | None = None):
        self.folder = Path(folder)
        self.specs = dict(specs)
        split = split_state_dict_into_shards_factory(
            self.specs, get_storage_size=lambda spec: spec.nbytes, filename_pattern=FILENAME_PATTERN,
            max_shard_size=parse_shard_size(max_shard_size))
        self.split = split
        self.total_parameters = total_parameters
        self.files: dict[str, Layout] = {}
        self.where: dict[str, str] = {}
        self.pending: dict[str, set[str]] = {}
        for filename, names in split.filename_to_tensors.items():
            layout = header({n: self.specs[n] for n in names}, METADATA)
            path = self.folder / filename
            with open(path, "wb") as f:  # the header now; the data section is filled in by write()
                f.write(layout.header)
                f.truncate(layout.size)
            self.files[filename] = layout
            self.pending[filename] = set(names)
            for n in names:
                self.where[n] = filename
        self.closed = False

    @property
    def filenames(self) -> list[str]:
        return list(self.files)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one tensor in its place; it must have the dtype and shape announced for it."""
        if name not in self.where:
            raise KeyError(f"{name} is not one of the tensors this checkpoint was planned with")
        spec = self.specs[name]
        got = TensorSpec.of(tensor)
        if got != spec:
            raise ValueError(f"{name}: planned as {spec.dtype} {list(spec.shape)}, got {got.dtype} {list(got.shape)}")
        filename = self.where[name]
        if name not in self.pending[filename]:
            raise ValueError(f"{name} was written twice")
        layout = self.files[filename]
        start, _ = layout.offsets[name]
        data = tensor_bytes(tensor)
        fd = os.open(self.folder / filename, os.O_WRONLY)
        try:
            at, view = len(layout.header) + start, data
            while len(view):
                n = os.pwrite(fd, view, at)
                at, view = at + n, view[n:]
        finally:
            os.close(fd)
        self.pending[filename].discard(name)

    def missing(self) -> list[str]:
        return sorted(n for names in self.pending.values() for n in names)

    def close(self) -> None:
        if self.closed:
            return
        left = self.missing()
        if left:
            raise RuntimeError(f"{len(left)} tensor(s) were never written, e.g. {left[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_parameters": self.total_parameters, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            if self.total_parameters is None:
                del index["metadata"]["total_parameters"]
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


def write_tensors(folder, tensors: dict[str, torch.Tensor], *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  total_parameters: int | None = None) -> list[str]:
    """Write a whole state dict at once (tensors in dict order); returns the file names written."""
    with ShardedWriter(folder, {k: TensorSpec.of(v) for k, v in tensors.items()}, max_shard_size=max_shard_size,
                       total_parameters=total_parameters) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.filenames + ([INDEX_NAME] if len(writer.filenames) > 1 else [])


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "INDEX_NAME", "ShardedWriter", "WEIGHTS_NAME", "parse_shard_size", "write_tensors"]
