"""Read a checkpoint a block at a time: a model on the meta device whose tensors come from the files on demand.

`SafetensorsSource(folder)` is a checkpoint's weights, one `model.safetensors` or the shards of
`model.safetensors.index.json`, read a tensor at a time through `safetensors.safe_open` (a file is
never read whole; the open handles hold no tensor data, only what `get` returns does).

`LazyModel(folder)` is the checkpoint's model (its own head class, from `architectures`) built on
the meta device: the parameters take no memory until loaded, while buffers that are not saved
(position ids, rotary frequencies, ...) are built on the CPU as `from_pretrained` builds them.

    lazy = LazyModel("path/to/llama")          # raises NotStreamable(reason) if the files are not exactly
                                               # what from_pretrained would load without renaming or casting
    lazy.load_outside_blocks()                 # embeddings, final norm, head
    with lazy.blocks_on_demand():              # a whole forward pass, one block in memory at a time
        out = lazy.model(**batch)
    for i in range(lazy.num_blocks):           # or by hand
        block = lazy.load_block(i, device="cuda")   # this block's tensors, from the files
        ...                                         # run it, read its MLP, ...
        lazy.release_block(i)                       # back to the meta device: the memory is freed

`load(names)`/`release(names)` do the same for any tensors by name (tied weights are loaded once
and stay tied). A loaded tensor holds exactly the file's bytes, in the file's dtype: the checks
below make sure that is what `from_pretrained(dtype="auto")` would have given too.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..families import family_for, head_name
from .safetensors_format import DTYPES, TensorSpec, read_header
from .save import NotStreamable, UnreadableCheckpoint, weight_specs
from .writer import INDEX_NAME, WEIGHTS_NAME


class SafetensorsSource:
    """The weights of a checkpoint folder: names, dtypes and shapes from the headers, tensors on request."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UnreadableCheckpoint(f"{index.name} has no readable weight_map") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / WEIGHTS_NAME).is_file():
            weight_map, files = None, [WEIGHTS_NAME]
        else:
            raise UnreadableCheckpoint(f"{self.folder} has no {WEIGHTS_NAME} or {INDEX_NAME}")
        self.files = files
        self.specs: dict[str, TensorSpec] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            try:
                self._read(name)
            except NotStreamable:
                raise
            except Exception as err:  # any malformed header: leave it to the loader's own checks and messages
                raise UnreadableCheckpoint(f"{name} is truncated or corrupt ({type(err).__name__}: {err})") from None
        if weight_map is not None and weight_map != self.file_of:
            raise UnreadableCheckpoint(f"{INDEX_NAME} does not list exactly the tensors its shards hold")

    def _read(self, name: str) -> None:
        entries, _ = read_header(self.folder / name)
        end = 0
        for key, info in entries.items():
            if info.get("dtype") not in DTYPES:
                raise NotStreamable(f"{name}: tensor {key} has dtype {info.get('dtype')}, which torch cannot hold")
            spec = TensorSpec(DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]))
            start, stop = info["data_offsets"]
            if stop - start != spec.nbytes:
                raise UnreadableCheckpoint(f"{name} is corrupt: {key} does not fill its {stop - start} bytes")
            self.specs[key] = spec
            self.file_of[key] = name
            end = max(end, stop)
        size = (self.folder / name).stat().st_size
        with open(self.folder / name, "rb") as f:
            header_len = 8 + int.from_bytes(f.read(8), "little")
        if size != header_len + end:  # cut off while downloading, say
            raise UnreadableCheckpoint(f"{name} is truncated or corrupt ({size} bytes, its header describes "
                                f"{header_len + end})")

    def keys(self) -> list[str]:
        return list(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        """One tensor, read from its file (on the CPU, then moved to `device`)."""
        from safetensors import safe_open

        # A handle per read: a handle kept open keeps every page it has read mapped into the process, so
        # the resident size would grow to the whole checkpoint (reclaimable, but counted).
        with safe_open(str(self.folder / self.file_of[name]), framework="pt", device="cpu") as f:
            t = f.get_tensor(name)
        return t if device is None else t.to(device)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def source_config(folder: Path, *, fused_ok: bool = False):
    """(stock head class name, the class to build, its config) of a checkpoint folder; a checkpoint this
    tool wrote (model_type mlpfusion_*) gets the package's fused class when `fused_ok`."""
    import transformers

    from .. import modeling
    from ..families import is_fused_type

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UnreadableCheckpoint(f"{folder / 'config.json'} cannot be read") from None
    model_type = data.get("model_type")
    family_for(model_type, fused_ok=fused_ok)
    head = head_name(model_type, data.get("architectures"))
    cls = modeling.model_class_for(head) if is_fused_type(model_type) else getattr(transformers, head)
    return head, cls, cls.config_class.from_pretrained(str(folder))


def load_dtype(config, source: SafetensorsSource) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` gives: the config's, else the checkpoint's floating dtype.

    Every floating tensor of the checkpoint must already have it (no cast on load), else NotStreamable."""
    floating = {spec.dtype for spec in source.specs.values() if spec.dtype.is_floating_point}
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        if len(floating) > 1:
            raise NotStreamable(f"the checkpoint mixes floating dtypes ({', '.join(sorted(map(str, floating)))})")
        dtype = next(iter(floating), torch.float32)
    elif floating - {dtype}:
        raise NotStreamable(f"config.json says {dtype} but the weights are {', '.join(sorted(map(str, floating)))}: "
                            "loading casts them")
    return dtype


class LazyModel:
    """See the module docstring."""

    def __init__(self, folder: str | Path, *, source: SafetensorsSource | None = None, fused_ok: bool = False):
        """`fused_ok`: also open a checkpoint this tool wrote (with the fused class), e.g. to calibrate it."""
        from accelerate import init_empty_weights

        self.folder = Path(folder)
        self.source = source if source is not None else SafetensorsSource(self.folder)
        self.head, cls, config = source_config(self.folder, fused_ok=fused_ok)
        self.family = family_for(config.model_type, fused_ok=fused_ok)
        self.dtype = load_dtype(config, self.source)
        if cls._keep_in_fp32_modules and self.dtype in (torch.float16, torch.bfloat16):
            raise NotStreamable(f"{cls.__name__} keeps some modules in float32 when loaded in {self.dtype}")
        config.dtype = self.dtype
        with init_empty_weights(include_buffers=False), default_dtype(self.dtype):
            model = cls(config)
        model.tie_weights()  # init_empty_weights re-creates each parameter it moves, which unties them
        model.eval()
        if model.can_generate() and hasattr(model, "adjust_generation_fn"):  # generation_config.json, as loading does
            model.adjust_generation_fn(generation_config=None, from_auto_class=False, from_pipeline=False,
                                       pretrained_model_name_or_path=str(self.folder), cache_dir=None,
                                       force_download=False, proxies=None, local_files_only=True, token=None,
                                       revision="main", subfolder="", trust_remote_code=None)
        self.model = model
        self._slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}  # id(tensor) -> where it sits
        self._group: dict[str, int] = {}  # name -> id of its tensor (tied names share one)
        persistent = set(model.state_dict(keep_vars=True))
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for kind, table in ((True, module._parameters), (False, module._buffers)):
                for leaf, t in table.items():
                    if t is None:
                        continue
                    name = f"{mod_name}.{leaf}" if mod_name else leaf
                    slots = self._slots.setdefault(id(t), [])
                    if (module, leaf, kind) not in [(m, lf, k) for m, lf, k in slots]:
                        slots.append((module, leaf, kind))
                    if name in persistent:
                        self._group[name] = id(t)
        self._members: dict[int, list[str]] = {}
        for name, gid in self._group.items():
            self._members.setdefault(gid, []).append(name)
        self.file_key = self._check()
        names = {id(m): n for n, m in model.named_modules()}
        self.block_names = [names[id(b)] for b in self.family.block_list(model)]

    # --- the checks: is this exactly what from_pretrained would load? ----------------------------
    def _check(self) -> dict[str, str]:
        """name -> the file key it loads from; NotStreamable unless every tensor maps one to one, no renaming."""
        model, source = self.model, self.source
        meta_state = model.state_dict(keep_vars=True)
        file_key: dict[str, str] = {}
        used = set()
        for gid, names in self._members.items():
            present = [n for n in names if n in source]
            if not present:
                raise NotStreamable(f"the checkpoint has no tensor {names[0]} (loading would initialise it at random "
                                    "or take it from another name)")
            if len(present) > 1:
                raise NotStreamable(f"the checkpoint stores the tied weights {present} separately")
            key = present[0]
            want, got = TensorSpec.of(meta_state[names[0]]), source.specs[key]
            if want != got:
                raise NotStreamable(f"{key} is {got.dtype} {list(got.shape)} in the checkpoint; the model expects "
                                    f"{want.dtype} {list(want.shape)}")
            for n in names:
                file_key[n] = key
            used.add(key)
        ignored = [re.compile(p) for p in (type(model)._keys_to_ignore_on_load_unexpected or [])]
        non_persistent = {name for name, _ in model.named_buffers()} - set(meta_state)
        extra = [k for k in source.keys() if k not in used and k not in non_persistent
                 and not any(p.search(k) for p in ignored)]
        if extra:
            raise NotStreamable(f"the checkpoint has tensors the model does not expect under those names "
                                f"(transformers would rename or drop them on load), e.g. {extra[:3]}")
        return file_key

    # --- blocks -----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def block(self, i: int) -> nn.Module:
        return self.family.block_list(self.model)[i]

    def names_under(self, prefix: str) -> list[str]:
        """The persistent tensors of the module `prefix` ("" = the whole model), in state-dict order."""
        return [n for n in self._group if not prefix or n == prefix or n.startswith(prefix + ".")]

    def outside_blocks(self) -> list[str]:
        inside = tuple(b + "." for b in self.block_names)
        return [n for n in self._group if not n.startswith(inside)]

    def load(self, names, device: str | torch.device | None = None) -> None:
        """Give these tensors (and any tied to them) their values from the files, on `device` (default CPU)."""
        for gid in dict.fromkeys(self._group[n] for n in names):
            first = self._members[gid][0]
            t = self.source.get(self.file_key[first], device)
            self._assign(gid, t)

    def release(self, names) -> None:
        """Put these tensors back on the meta device (their memory is freed once nothing else holds it)."""
        for gid in dict.fromkeys(self._group[n] for n in names):
            module, leaf, is_param = self._slots[gid][0]
            cur = (module._parameters if is_param else module._buffers)[leaf]
            self._assign(gid, torch.empty_like(cur, device="meta"))

    def _assign(self, gid: int, t: torch.Tensor) -> None:
        slots = self._slots.pop(gid)
        module, leaf, is_param = slots[0]
        old = (module._parameters if is_param else module._buffers)[leaf]
        new = nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
        for module, leaf, is_param in slots:
            (module._parameters if is_param else module._buffers)[leaf] = new
        self._slots[id(new)] = slots
        for n in self._members.pop(gid):
            self._group[n] = id(new)
            self._members.setdefault(id(new), []).append(n)

    def load_block(self, i: int, device: str | torch.device | None = None) -> nn.Module:
        """Block i with its tensors loaded (see the module docstring); returns the block module."""
        self.load(self.names_under(self.block_names[i]), device)
        return self.block(i)

    def release_block(self, i: int) -> None:
        self.release(self.names_under(self.block_names[i]))

    def load_outside_blocks(self, device: str | torch.device | None = None) -> None:
        """Everything that is not in a block: embeddings, final norm, pooler, head."""
        self.load(self.outside_blocks(), device)

    @contextmanager
    def blocks_on_demand(self, device: str | torch.device | None = None):
        """Inside this context each block loads itself just before it runs and is released right after, so a
        forward pass of the whole model holds one block at a time (load the rest first: `load_outside_blocks`)."""
        handles = []
        for i in range(self.num_blocks):
            block = self.block(i)
            handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self.load_block(i, device) and None))
            handles.append(block.register_forward_hook(lambda m, a, o, i=i: self.release_block(i)))
        try:
            yield self.model
        finally:
            for h in handles:
                h.remove()

    def loaded(self) -> list[str]:
        """The persistent tensors that are loaded now (not on the meta device)."""
        out = []
        for name, gid in self._group.items():
            module, leaf, is_param = self._slots[gid][0]
            if not (module._parameters if is_param else module._buffers)[leaf].is_meta:
                out.append(name)
        return out

    def release_all(self) -> None:
        self.release(list(self._group))

    def load_all(self, device: str | torch.device | None = None) -> nn.Module:
        """The whole model, loaded (what `from_pretrained(dtype="auto")` gives, for tests and small models)."""
        self.load(list(self._group), device)
        return self.model

    def saved_specs(self) -> dict[str, TensorSpec]:
        """What `save_pretrained` would write for this model (tied weights once)."""
        return weight_specs(self.model)


__all__ = ["LazyModel", "NotStreamable", "SafetensorsSource", "default_dtype", "load_dtype", "source_config"]
