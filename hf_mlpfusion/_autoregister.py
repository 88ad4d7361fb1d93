"""Register the fused classes with the transformers Auto classes when transformers loads them.

`import hf_mlpfusion` must stay cheap (the CLI's `--help` and `--version` live inside the package
and must not import torch), yet users rely on

    import hf_mlpfusion
    AutoModel.from_pretrained(fused_dir)

So registration is tied to the transformers modules it fills, not to our import:

- an Auto module that is already loaded is filled at once (`install()`, run by `import hf_mlpfusion`);
- for the others, a `sys.meta_path` finder wraps the loaders of transformers' modules (and of our
  own), and fills `configuration_auto` / `tokenization_auto` / `modeling_auto` as soon as the
  module has executed and no transformers or hf_mlpfusion module is half-imported any more,
  before the user's `import` statement returns.

Filling a module imports torch, transformers' modeling code and ours. Doing it while, say,
`modeling_utils` or `hf_mlpfusion.modeling` is half-imported would find names not defined yet; so
it waits until the outermost such import has finished. Once every piece is registered the finder
steps aside (it answers None at once). This file imports only the standard library.
"""

from __future__ import annotations

import sys
import threading
import warnings

# transformers module -> the piece of registration it needs, in the order they are filled
TARGETS = {
    "transformers.models.auto.configuration_auto": "configs",
    "transformers.models.auto.tokenization_auto": "tokenizers",
    "transformers.models.auto.modeling_auto": "models",
}

_done: set[str] = set()  # pieces registered (or given up on, with a warning)
_wrapped: set[str] = set()  # modules whose loader we wrapped
_in_progress: set[str] = set()  # wrapped modules executing right now
_lock = threading.Lock()
_dirty = False


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith(("transformers.", "hf_mlpfusion."))


def _initializing(name: str) -> bool:
    if name in _wrapped:
        return name in _in_progress
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _loaded(name: str) -> bool:
    return name in sys.modules and not _initializing(name)


def _half_imported() -> bool:
    """Is any transformers or hf_mlpfusion module still executing (so some of its names are missing)?"""
    if _in_progress:
        return True
    return any(_watched(name) and name not in _wrapped and _initializing(name) for name in list(sys.modules))


def _pending() -> list[str]:
    return [piece for name, piece in TARGETS.items() if piece not in _done and _loaded(name)]


def sync() -> None:
    """Register every piece whose Auto module is loaded, once nothing is half-imported (idempotent)."""
    global _dirty
    if len(_done) == len(TARGETS) or not _pending():
        return
    if not _lock.acquire(blocking=False):
        _dirty = True  # registering already (a nested import, or another thread): the holder looks again
        return
    try:
        while True:
            _dirty = False
            _run_pending()
            if not _dirty:
                break
    finally:
        _lock.release()


def _run_pending() -> None:
    for piece in _pending():
        if _half_imported():
            return  # retried when the outermost import finishes
        try:
            from hf_mlpfusion import modeling

            getattr(modeling, f"register_{piece}")()
        except Exception as err:  # noqa: BLE001 - never break the user's import of transformers
            warnings.warn(f"hf-mlpfusion could not register its {piece} with transformers ({err}); "
                          "load fused checkpoints with trust_remote_code=True instead", RuntimeWarning, stacklevel=2)
        _done.add(piece)


class _Loader:
    """The real loader of a watched module, plus `sync()` once the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        name = module.__name__
        _wrapped.add(name)
        _in_progress.add(name)
        try:
            self._loader.exec_module(module)
        finally:
            _in_progress.discard(name)
        sync()

    def __getattr__(self, name):  # get_code, get_source, is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class _Finder:
    """Find watched modules with the finders after this one, and wrap their loader."""

    def find_spec(self, fullname, path=None, target=None):
        if len(_done) == len(TARGETS) or not _watched(fullname):
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _Finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register what can be registered now, and watch for the Auto modules not loaded yet."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    sync()


def registered() -> set[str]:
    """The pieces registered so far ("configs", "tokenizers", "models")."""
    return set(_done)
