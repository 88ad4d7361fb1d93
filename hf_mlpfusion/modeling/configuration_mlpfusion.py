"""Configurations of MLP-fused models, for every family (one file, the same for all of them).

This file and `modeling_mlpfusion.py` are copied next to every fused checkpoint so that
`trust_remote_code=True` loads it without hf-mlpfusion installed; they import only torch and
transformers and never change when a family is added.

A fused config is the family's own stock config class (BertConfig, LlamaConfig, ...) plus:

- `intermediate_sizes`: one MLP width per layer (fused layers are narrower);
- `count_layers`: the layers whose MLP scales its hidden features by a frozen count vector;
- `mlp_layout`: where the MLPs are (read by the modeling file): the blocks below the base model,
  the input projections, the output projection and the activation of a block;
- `mlpfusion`: how the checkpoint was made (method, ratio, layers, seed, source, ...).

Its `model_type` is `mlpfusion_<stock model_type>` and its class name `MLPFusion<StockConfig>`;
the classes are made on first use from the stock class, so any family transformers knows can be
described by config.json alone.
"""

from __future__ import annotations

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

PREFIX = "mlpfusion_"
CLASS_PREFIX = "MLPFusion"
FORMAT = 2  # 1: release 0.1.0 (counts inside the output projection); 2: counts as their own module


def fused_model_type(stock_model_type: str) -> str:
    return PREFIX + stock_model_type


def stock_model_type(model_type: str | None) -> str | None:
    """The stock model type a fused model type was made from; None for a model type that is not fused."""
    if isinstance(model_type, str) and model_type.startswith(PREFIX):
        return model_type[len(PREFIX):]
    return None


class MLPFusionConfigMixin:
    """The fields every fused config adds to its stock config (see the module docstring)."""

    intermediate_sizes: list[int] | None = None
    count_layers: list[int] | None = None
    mlp_layout: dict | None = None
    mlpfusion: dict | None = None

    # set on each generated class: the stock config class it extends, and the layout to assume when
    # config.json has none (checkpoints of release 0.1.0; hf-mlpfusion sets it when it registers the class)
    stock_config_class = None
    _default_mlp_layout = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.intermediate_sizes is not None:
            self.intermediate_sizes = [int(s) for s in self.intermediate_sizes]
        self.count_layers = sorted(int(i) for i in (self.count_layers or []))
        self.mlpfusion = dict(self.mlpfusion or {})

    def resolved_mlp_layout(self) -> dict:
        """The layout of the MLPs; a checkpoint without one was written by 0.1.0 (format 1)."""
        if self.mlp_layout:
            return dict(self.mlp_layout)
        if self._default_mlp_layout is None:
            raise ValueError(f"config of type {self.model_type} has no `mlp_layout`: it was not written by "
                             "hf-mlpfusion, or install hf-mlpfusion to read a checkpoint of release 0.1.0")
        return {**self._default_mlp_layout, "format": 1}


_CLASSES: dict[str, type] = {}


def config_class_for(stock_type: str) -> type:
    """The fused config class of a stock model type (made once, then cached)."""
    if stock_type not in _CLASSES:
        stock = CONFIG_MAPPING[stock_type]
        name = CLASS_PREFIX + stock.__name__
        cls = type(name, (MLPFusionConfigMixin, stock), {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"A `{stock.__name__}` whose MLPs were fused by hf-mlpfusion (see {__name__}).",
            "__annotations__": {"intermediate_sizes": "list[int] | None", "count_layers": "list[int] | None",
                                "mlp_layout": "dict | None", "mlpfusion": "dict | None"},
            "model_type": fused_model_type(stock_type),
            "stock_config_class": stock,
        })
        _CLASSES[stock_type] = cls
    return _CLASSES[stock_type]


def __getattr__(name: str):
    # `auto_map` names classes such as "configuration_mlpfusion.MLPFusionLlamaConfig": make them on demand.
    if name.startswith(CLASS_PREFIX) and name.endswith("Config"):
        stock = getattr(transformers, name[len(CLASS_PREFIX):], None)
        stock_type = getattr(stock, "model_type", None)
        if isinstance(stock, type) and stock_type in CONFIG_MAPPING and CONFIG_MAPPING[stock_type] is stock:
            return config_class_for(stock_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
