"""One small adapter per model family; `get_adapter` is the only lookup the pipeline uses."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from .base import Adapter, MLPWeights
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .roberta import RobertaAdapter

ADAPTERS: tuple[Adapter, ...] = (BertAdapter(), RobertaAdapter(), GPT2Adapter())


def supported() -> str:
    return ", ".join(f"{a.family} ({', '.join(a.heads)})" for a in ADAPTERS)


def get_adapter(model_type: str | None) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if any(model_type == a.fused_model_type for a in ADAPTERS):
        raise UnsupportedArchitectureError(
            f"this checkpoint ({model_type}) is already MLP-fused; fuse the original model instead"
        )
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; supported model types: {supported()}"
    )


def head_name(adapter: Adapter, architectures: list[str] | None) -> str:
    """The stock head class to load: the checkpoint's own `architectures[0]`, else the base model."""
    name = (architectures or [adapter.base_class])[0]
    if name not in adapter.heads:
        raise UnsupportedArchitectureError(
            f"unsupported head {name!r} for {adapter.family}; supported heads: {', '.join(adapter.heads)}"
        )
    return name


__all__ = ["ADAPTERS", "Adapter", "MLPWeights", "get_adapter", "head_name", "supported"]
