"""Whether a MODEL argument names a local folder or a Hub id: one rule for every command.

Standard library only (and `errors`), so that `mlpfusion info` can use it without importing torch.
A name that exists on disk is local; so is one shaped like a path that is not there (it starts with
".", "/" or "~", has more than one "/", holds the OS separator, or ends in "/"), and that is an
error here, so that a typo never turns into a Hub download. Anything else ("org/name", "gpt2") is a
Hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError


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
