"""GGUF sources: compress a `.gguf` file (llama.cpp's format) directly.

Many users hold their models as GGUF files. transformers' GGUF loader (it needs the `gguf`
package) dequantises such a file to a float32 model of its family, with its tokenizer; GGUF is not
a pickle, so nothing executes. The loaded model carries a `quantization_config` that makes
`save_pretrained` refuse it, so the model is rebuilt from its config without it and given the
dequantised weights: the result is a plain float32 checkpoint of the stock family class, which
fuses and saves like any other (safetensors only). The tokenizer comes from the file as well.

A GGUF source is a path to a `.gguf` file, or a folder that holds exactly one `.gguf` file and no
`config.json`.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

from .errors import CorruptCheckpointError, InvalidConfigError, UnsupportedArchitectureError

SUFFIX = ".gguf"


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a source path names, or None when it is not a GGUF source."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == SUFFIX:
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InvalidConfigError(
                f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}"
                f"{', ...' if len(found) > 3 else ''}): name the one to "
                f"compress, e.g. `mlpfusion compress {path / found[0].name}`"
            )
    return None


def gguf_source(name: str | Path | None) -> Path | None:
    """The GGUF file a MODEL argument names (`~` expanded; a .gguf file, or a folder holding one and
    no config.json), or None when it names no existing GGUF source."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return gguf_file(path) if path.exists() else None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise InvalidConfigError("reading a GGUF file needs the gguf package: pip install gguf")


@contextmanager
def _switchable_bars():
    """transformers' GGUF reader draws a plain tqdm bar, which transformers' own switch for progress
    bars (`-q` turns it off) does not reach; for the length of the read it draws transformers' tqdm,
    which obeys the switch."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
        from transformers.utils import logging as hf_logging
    except ImportError:  # another transformers layout: its bar, as it is
        yield
        return
    original = getattr(reader, "tqdm", None)
    if original is None:
        yield
        return
    reader.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        reader.tqdm = original


def load_gguf(path: str | Path):
    """(model, tokenizer) of a GGUF file: the stock float32 model of its family (see the module docstring)."""
    import torch
    import transformers

    _require_gguf()
    path = Path(path)
    folder, name = str(path.parent), path.name
    try:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with _switchable_bars():
            loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as err:
        text = str(err).splitlines()[0][:200]
        if "architecture" in text.lower() or "not supported" in text.lower():
            raise UnsupportedArchitectureError(f"{path}: transformers cannot read this GGUF architecture ({text})") from None
        raise CorruptCheckpointError(f"{path} could not be read as GGUF ({text}): check the file") from None
    except Exception as err:  # noqa: BLE001 - the gguf reader raises many kinds for a damaged file
        raise CorruptCheckpointError(
            f"{path} could not be read as GGUF ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}):"
            " check the file"
        ) from None
    data = config.to_dict()
    data.pop("quantization_config", None)
    for key in ("model_type", "transformers_version", "_name_or_path", "architectures"):
        data.pop(key, None)
    clean = type(config)(**data)
    clean.architectures = [type(loaded).__name__]
    with torch.device("meta"):
        model = type(loaded)(clean)
    state = loaded.state_dict()
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in loaded.named_buffers():  # non-persistent buffers (rotary frequencies)
        mod_name, _, leaf = name.rpartition(".")
        target = model.get_submodule(mod_name) if mod_name else model
        if target._buffers.get(leaf) is not None and target._buffers[leaf].is_meta:
            target._buffers[leaf] = buf
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CorruptCheckpointError(f"{path} lacks tensors the model needs ({', '.join(left[:3])}): check the file")
    model.generation_config = loaded.generation_config
    model.config._name_or_path = path.stem
    return model.eval(), tokenizer


def convert_gguf(path: str | Path, output: str | Path) -> Path:
    """Write the dequantised model and tokenizer of a GGUF file as a safetensors checkpoint folder."""
    model, tokenizer = load_gguf(path)
    output = Path(output)
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return output


__all__ = ["convert_gguf", "gguf_file", "gguf_source", "load_gguf"]
