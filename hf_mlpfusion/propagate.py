"""Run a model one block at a time on stored hidden states (linear in depth).

Calibration needs, for every fused layer, what enters that layer's MLP in the fused model and in
the original. Running each model from its embeddings for every layer costs depth^2 blocks; this
module runs every block once instead:

1. `trace(model, encoded)` runs the model's own forward pass with every block replaced by an
   identity that records the block's arguments (the model still computes its attention masks,
   rotary embeddings, ... as it always does), so no block's weights are touched;
2. `BlockStream.step(i)` then runs block i alone on the hidden states that block i - 1 produced,
   with the arguments traced for it, and keeps its output for block i + 1.

Hooks can be put on any module inside the block while it runs (`run_block(..., capture=...)`), which
is how calibration reads the MLP's input and the residual stream at the non-padding tokens.

Devices: the trace runs where the model's embeddings are (the CPU, as loaded); `Trace.to(device)` then
moves what it recorded, and each block is put on the device while it runs (`on_device`), so the blocks,
the captured activations and everything computed from them (statistics, refit, distillation) are on
`--device`, while the model stays where it is. Every path (in memory and block by block) takes this
same route, so they compute the same numbers on any device.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .families import Family


class _Identity(Exception):
    pass


@dataclass
class Trace:
    """Per batch: the hidden states entering block 0, each block's other arguments, and the mask."""

    hidden: list[torch.Tensor]  # [B, T, d] per batch
    args: list[list[tuple]]  # args[i][b]: positional arguments of block i after the hidden states
    kwargs: list[list[dict]]  # kwargs[i][b]: keyword arguments of block i
    masks: list[torch.Tensor]  # [B, T] attention mask per batch
    tuple_output: bool = False  # whether a block returns a tuple (hidden states first)
    extra: list = field(default_factory=list)

    def to(self, device) -> "Trace":
        """This trace with every recorded tensor on `device`, in place (a no-op where they are already).
        A tensor that several blocks or batches share (attention masks, rotary embeddings) stays one tensor."""
        device = as_device(device)
        moved: dict[int, torch.Tensor] = {}

        def move(v):
            if isinstance(v, torch.Tensor):
                if v.device == device:
                    return v
                if id(v) not in moved:
                    moved[id(v)] = v.to(device)
                return moved[id(v)]
            if isinstance(v, tuple):
                return tuple(move(u) for u in v)
            if isinstance(v, list):
                return [move(u) for u in v]
            if isinstance(v, dict):
                return {k: move(u) for k, u in v.items()}
            return v

        # all at once: every tensor moved stays alive until the last is, so no two share an id()
        self.hidden, self.args, self.kwargs, self.masks = move((self.hidden, self.args, self.kwargs, self.masks))
        return self


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_body(model: nn.Module, batch: dict, device) -> None:
    body = model.base_model
    kwargs = {k: v.to(device) for k, v in batch.items()}
    params = inspect.signature(body.forward).parameters
    if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["use_cache"] = False  # no key/value cache objects in the traced arguments
    body(**kwargs)


def trace(model: nn.Module, family: Family, encoded: list[dict], device=None) -> Trace:
    """Record every block's inputs for every batch without running any block (see the module docstring),
    with the batches on `device` (default: where the model's first parameter is)."""
    blocks = family.block_list(model)
    n = len(blocks)
    t = Trace([], [[] for _ in range(n)], [[] for _ in range(n)], [])
    device = device if device is not None else next(model.parameters()).device
    # what a block returns (tensor or tuple): ask the first block once, on the first batch
    first = {}

    def probe(module, args, kwargs, output):
        first["tuple"] = isinstance(output, (tuple, list))
        first["len"] = len(output) if isinstance(output, (tuple, list)) else 0
        raise _Identity

    handle = blocks[0].register_forward_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            try:
                _run_body(model, encoded[0], device)
            except _Identity:
                pass
    finally:
        handle.remove()
    t.tuple_output = first.get("tuple", False)

    originals = [b.forward for b in blocks]

    def recorder(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                t.hidden.append(hidden.detach())
            t.args[i].append(tuple(args[1:]))
            t.kwargs[i].append(dict(kwargs))
            if t.tuple_output:
                return (hidden,) + (None,) * (first["len"] - 1)
            return hidden

        return forward

    try:
        for i, b in enumerate(blocks):
            b.forward = recorder(i)
        with torch.no_grad():
            for batch in encoded:
                t.masks.append(batch["attention_mask"])
                _run_body(model, batch, device)
    finally:
        for b, f in zip(blocks, originals):
            b.forward = f
    return t


def at_tokens(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`t` ([B, T, ...]) at the non-padding tokens of `mask` ([B, T]): [N, ...], float32, where `t` is."""
    return t[mask.to(t.device).bool()].detach().float()


def move_tensors(module: nn.Module, device) -> list[tuple[torch.Tensor, torch.device]]:
    """Put `module`'s parameters and buffers on `device`, in place (`.data`): they stay the objects the
    model, a `float32` context or a `LazyModel` knows. Tensors on the meta device stay there.
    Returns (tensor, where it was) of each one moved."""
    device = as_device(device)
    moved = []
    for t in list(module.parameters()) + list(module.buffers()):
        if not t.is_meta and t.device != device:
            moved.append((t, t.device))
            t.data = t.data.to(device)
    return moved


@contextmanager
def on_device(module: nn.Module, device):
    """`module` on `device` inside the context (`move_tensors`), each tensor back where it was after,
    with what changed on the device (a refit). A no-op when everything is on `device` already."""
    moved = move_tensors(module, device)
    try:
        yield module
    finally:
        for t, where in moved:
            t.data = t.data.to(where)


def as_device(device) -> torch.device:
    """`device` as a torch.device with its index ("cuda" -> "cuda:N", the current one), as tensors report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def compute_device(model: nn.Module, device=None) -> torch.device:
    """The device the blocks run on: `device`, or (None) where the model's first parameter is."""
    return as_device(device) if device is not None else next(model.parameters()).device


class _EndPass(Exception):
    """Raised at `run_block`'s `stop` module: the rest of the block is not wanted."""


def _end_pass(module, args):
    raise _EndPass


def run_block(block: nn.Module, trace_: Trace, i: int, hidden: list[torch.Tensor],
              capture: dict[str, nn.Module] | None = None,
              capture_output: dict[str, nn.Module] | None = None,
              hooks: Callable[[Callable[[], torch.Tensor]], list] | None = None,
              stop: nn.Module | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Block i on `hidden` (one tensor per batch): its outputs, and the first input of each module in
    `capture` (the output of each module in `capture_output`) at the non-padding tokens ([N, d]
    float32 where the block runs, batches concatenated). `hooks(mask)` may register more hooks for the run
    (`mask()`: the running batch's attention mask) and returns their handles.

    `stop`: a module of the block at whose input each batch's pass ends (after the other hooks at that
    input), when only what the hooks take is wanted; no outputs are returned then, and every capture
    must have been reached before it."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in (*(capture or {}), *(capture_output or {}))}
    mask_box: list[torch.Tensor] = []
    handles = []

    def keep(name, t):
        got[name].append(at_tokens(t, mask_box[0]))

    for name, module in (capture or {}).items():
        handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: keep(name, args[0])))
    for name, module in (capture_output or {}).items():
        handles.append(module.register_forward_hook(lambda mod, args, out, name=name: keep(name, out)))
    if hooks is not None:
        handles += hooks(lambda: mask_box[0])
    if stop is not None:
        handles.append(stop.register_forward_pre_hook(_end_pass))  # last: the hooks at its input run first
    outs = []
    try:
        with torch.no_grad():
            for b, h in enumerate(hidden):
                mask_box[:] = [trace_.masks[b]]
                try:
                    out = block(h, *trace_.args[i][b], **trace_.kwargs[i][b])
                except _EndPass:
                    continue
                if stop is not None:
                    raise RuntimeError(f"block {i} ran to its end without reaching the stop module {type(stop).__name__}")
                outs.append(_block_output(out))
    finally:
        for handle in handles:
            handle.remove()
    if stop is not None and any(len(v) != len(hidden) for v in got.values()):
        raise RuntimeError(f"block {i} reached its stop module before a captured one: {sorted(got)}")
    return outs, {name: torch.cat(v) if v else torch.empty(0) for name, v in got.items()}


__all__ = ["Trace", "as_device", "at_tokens", "compute_device", "move_tensors", "on_device", "run_block", "trace"]
