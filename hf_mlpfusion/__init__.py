"""hf-mlpfusion: make Hugging Face transformer checkpoints smaller by NTK-approximating MLP fusion.

    from hf_mlpfusion import fuse, FusionConfig
    fused = fuse(model, FusionConfig(ratio=0.25, layers=range(4, 12), seed=0))
    fused.save_pretrained("out")   # then: AutoModel.from_pretrained("out")

Importing the package registers the fused model types with the transformers Auto classes. The
import itself is cheap (no torch, no transformers): the registration runs as transformers loads
its Auto modules (`hf_mlpfusion._autoregister`), and the names below are loaded on first use.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

from . import _autoregister  # noqa: E402  (standard library only)

# public name -> (module, attribute); None: the module itself
_LAZY = {
    "fuse": ("fuse", "fuse"),
    "FusionConfig": ("config", "FusionConfig"),
    "parse_layers": ("config", "parse_layers"),
    "MLPFusionError": ("errors", "MLPFusionError"),
    "compress": ("compress", None),  # the file pipeline: hf_mlpfusion.compress.compress(...)
    "CompressResult": ("compress", "CompressResult"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_mlpfusion' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keep `hf_mlpfusion.fuse` the function: importing the submodule `hf_mlpfusion.fuse` would
    otherwise bind the module over it (the import system sets the attribute on the package)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name][1] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

_autoregister.install()

__all__ = ["CompressResult", "FusionConfig", "MLPFusionError", "compress", "fuse", "parse_layers", "__version__"]
