"""The safetensors file format, one tensor at a time: headers written before the data exists.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. To write a
checkpoint shard by shard while the tensors are still being computed, `header()` lays a file out
exactly as `save_file` would (same tensor order, same JSON, same padding), so the header can be
written first and each tensor's bytes put at its offset when it is ready. The result is byte for
byte what `save_file` writes for the same tensors (tests/test_streaming.py checks it for every
dtype).

`save_file`'s layout: an 8-byte little-endian header length, the header (compact JSON:
`__metadata__` first, then every tensor's dtype, shape and data offsets, padded with spaces to a
multiple of 8), then the tensors' bytes back to back, ordered by dtype (in safetensors' own dtype
order, learnt here by asking safetensors once) and then by name.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass

import torch
from safetensors import torch as st_torch

#: safetensors dtype name -> torch dtype, as safetensors.torch itself maps them.
DTYPES: dict[str, torch.dtype] = dict(getattr(st_torch, "_TYPES", {})) or {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, before it exists: enough to lay it out in a file."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tensor.dtype, tuple(int(s) for s in tensor.shape))


@functools.cache
def _dtype_rank() -> dict[str, int]:
    """Position of every dtype in safetensors' file order, read off a file safetensors writes itself."""
    probe = {}
    for name, dtype in DTYPES.items():
        try:
            probe[name] = torch.zeros(1, dtype=dtype)
        except (RuntimeError, TypeError):  # a dtype this torch cannot create
            continue
    data = st_torch.save(probe)
    (n,) = struct.unpack("<Q", data[:8])
    order = json.loads(data[8 : 8 + n])  # JSON objects keep their order: the data order
    return {info["dtype"]: i for i, info in enumerate(v for k, v in order.items() if k != "__metadata__")}


@dataclass(frozen=True)
class Layout:
    """Where every tensor of one file goes: the header bytes, then data offsets relative to its end."""

    header: bytes  # the 8-byte length and the padded JSON header
    offsets: dict[str, tuple[int, int]]  # name -> (start, end) in the data section

    @property
    def size(self) -> int:
        return len(self.header) + max((e for _, e in self.offsets.values()), default=0)


def header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> Layout:
    """The layout `safetensors.torch.save_file(tensors, metadata=metadata)` gives tensors of these specs."""
    rank = _dtype_rank()
    try:
        order = sorted(specs, key=lambda name: (rank[NAMES[specs[name].dtype]], name))
    except KeyError as err:
        raise ValueError(f"safetensors cannot store dtype {err.args[0]}") from None
    doc: dict = {}
    if metadata is not None:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets = {}
    at = 0
    for name in order:
        spec = specs[name]
        end = at + spec.nbytes
        doc[name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [at, end]}
        offsets[name] = (at, end)
        at = end
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return Layout(struct.pack("<Q", len(raw)) + raw, offsets)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as safetensors stores them (C order, little-endian, on the CPU)."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() and t.stride(0) != 1:  # a one-element view counts as contiguous at any stride (a width-1 MLP)
        t = t.new_empty(t.shape).copy_(t)  # (clone would keep the stride)
    return memoryview(t.view(torch.uint8).numpy())


def read_header(path) -> tuple[dict[str, dict], dict[str, str] | None]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets) and metadata, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    meta = doc.pop("__metadata__", None)
    return doc, meta


__all__ = ["DTYPES", "Layout", "NAMES", "TensorSpec", "header", "read_header", "tensor_bytes"]
