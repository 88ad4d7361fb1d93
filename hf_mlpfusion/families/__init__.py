"""The model families hf-mlpfusion knows: one small file each in this folder, found by itself.

A family file calls `register_family(Family(...))`; adding a family of an existing MLP kind is one
such file and nothing else. This package is the only place that knows families: the rest of the
package asks `family_of(model)` / `family_for(model_type)` and reads the `Family`'s fields.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UnsupportedArchitectureError
from ..modeling.configuration_mlpfusion import CLASS_PREFIX, fused_model_type, stock_model_type
from .base import Family

FAMILIES: dict[str, Family] = {}  # family name -> Family
_BY_MODEL_TYPE: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        if model_type in _BY_MODEL_TYPE and _BY_MODEL_TYPE[model_type].name != family.name:
            raise ValueError(f"model type {model_type!r} is already in family {_BY_MODEL_TYPE[model_type].name!r}")
        _BY_MODEL_TYPE[model_type] = family
    FAMILIES[family.name] = family
    return family


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def model_types() -> list[str]:
    """Every stock model type supported, in a stable order."""
    return sorted(_BY_MODEL_TYPE)


def supported() -> str:
    return ", ".join(model_types())


def stock_type(model_type: str | None) -> str | None:
    """The stock model type of a stock or fused model type."""
    return stock_model_type(model_type) or model_type


def is_fused_type(model_type: str | None) -> bool:
    return stock_model_type(model_type) is not None


def family_for(model_type: str | None, *, fused_ok: bool = True) -> Family:
    """The family of a stock model type (or of a fused one, unless `fused_ok` is False)."""
    if model_type is None:
        raise UnsupportedArchitectureError(
            "config.json has no model_type: it is not a transformers checkpoint, or add the model_type of its "
            f"architecture; supported model types: {supported()}"
        )
    stock = stock_model_type(model_type)
    if stock is not None and stock in _BY_MODEL_TYPE:
        if not fused_ok:
            raise UnsupportedArchitectureError(
                f"this checkpoint ({model_type}) is already MLP-fused; fuse the original model instead"
            )
        return _BY_MODEL_TYPE[stock]
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}: hf-mlpfusion supports the model types {supported()}"
    )


def family_of(model_or_config) -> Family:
    """The family of a model or config, stock or fused."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for(getattr(config, "model_type", None))


def head_name(model_type: str, architectures: list[str] | None) -> str:
    """The stock head class to load: the checkpoint's own `architectures[0]`, else the base model."""
    family = family_for(model_type)
    stock = stock_type(model_type)
    heads = family.heads(stock)
    name = (architectures or [family.base_class(stock)])[0]
    if is_fused_type(model_type) and name.startswith(CLASS_PREFIX):
        name = name[len(CLASS_PREFIX):]
    if name not in heads:
        raise UnsupportedArchitectureError(
            f"unsupported head {name!r} for {stock}; supported heads: {', '.join(sorted(heads))}"
        )
    return name


_discover()

__all__ = ["FAMILIES", "Family", "family_for", "family_of", "fused_model_type", "head_name", "is_fused_type",
           "model_types", "register_family", "stock_type", "supported"]
