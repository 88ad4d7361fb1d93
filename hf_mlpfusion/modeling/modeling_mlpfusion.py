"""Model classes of MLP-fused checkpoints, for every family (one file, the same for all of them).

Copied next to every fused checkpoint with `configuration_mlpfusion.py`, so that
`trust_remote_code=True` loads it without hf-mlpfusion installed; imports only torch and
transformers, and never changes when a family is added.

A fused class is the family's stock class (BertForMaskedLM, LlamaForCausalLM, ...) whose MLP
modules are rebuilt at the widths the config lists, before the weights are initialised or loaded.
Where they are comes from `config.mlp_layout`. Every projection stays a stock `nn.Linear` /
`Conv1D` of the new width; the frozen count vector n of a fused layer is its own module,
`CountScaledActivation`, wrapping the activation:

    linear pair:  f'(x) = W2' (n * act(W1' x + b1')) + b2
    gated triple: f'(x) = W_down' ((n * act(W_gate' x)) * (W_up' x))   (= n * the gated product)

so PEFT adapters on the projections merge exactly and quantisers see stock linear layers.
Class names are `MLPFusion<StockClass>` and are made on first use from the stock class.
"""

from __future__ import annotations

import json
import shutil
from functools import reduce
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from .configuration_mlpfusion import CLASS_PREFIX, config_class_for

BUNDLE_FILES = ("configuration_mlpfusion.py", "modeling_mlpfusion.py")

# Called as hook(folder, model) after a fused model saved itself (hf-mlpfusion adds its model card here).
SAVE_HOOKS: list = []
# The first is called as hook(folder, repo_id, commit_message=, private=, token=, create_pr=, revision=) to
# publish a saved folder (hf-mlpfusion adds `mlpfusion push` here); with none, HfApi.upload_folder is used.
PUSH_HOOKS: list = []


def _hooks(name: str) -> list:
    """This file's hooks. A copy loaded as remote code also runs hf-mlpfusion's when that can be imported,
    so a checkpoint re-saved or pushed from it gets the same card as from the package."""
    hooks = list(globals()[name])
    if __name__ != "hf_mlpfusion.modeling.modeling_mlpfusion":
        try:
            import importlib

            package = importlib.import_module("hf_mlpfusion.modeling")
            hooks += [hook for hook in getattr(package, name, ()) if hook not in hooks]
        except Exception:  # noqa: BLE001 - not installed (or broken): the bundle works on its own
            pass
    return hooks


class CountScaledActivation(nn.Module):
    """act(x) * n: the frozen count vector of a fused MLP (cluster sizes), between the activation and the
    output projection. `counts` is a persistent buffer: saved, moved by `.to()`, never trained."""

    def __init__(self, act, width: int):
        super().__init__()
        self.act = act
        self.register_buffer("counts", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.counts.to(x.dtype)


class CountScaledLinear(nn.Linear):
    """Release 0.1.0's output projection with the count vector on its input (kept to read its checkpoints)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("counts", torch.ones(in_features))

    def forward(self, x):
        return nn.functional.linear(x * self.counts.to(x.dtype), self.weight, self.bias)


class CountScaledConv1D(Conv1D):
    """Release 0.1.0's GPT-2 output projection with the count vector on its input."""

    def __init__(self, nf: int, nx: int):
        super().__init__(nf, nx)
        self.register_buffer("counts", torch.ones(nx))

    def forward(self, x):
        return super().forward(x * self.counts.to(x.dtype))


# --- the layout ----------------------------------------------------------------------------------


def get_path(root: nn.Module, path: str):
    return reduce(getattr, path.split("."), root) if path else root


def set_path(root: nn.Module, path: str, value) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_path(root, parent), leaf, value)


def out_width(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def _projection(like: nn.Module, n_in: int, n_out: int, counted_legacy: bool = False) -> nn.Module:
    """A new projection of the same kind as `like` (nn.Linear or Conv1D) from n_in to n_out features."""
    if isinstance(like, Conv1D):
        return (CountScaledConv1D if counted_legacy else Conv1D)(n_out, n_in)
    cls = CountScaledLinear if counted_legacy else nn.Linear
    return cls(n_in, n_out, bias=like.bias is not None)


def fused_blocks(model: nn.Module, layout: dict) -> list[nn.Module]:
    return list(get_path(model.base_model, layout["blocks"]))


def rebuild_mlps(model: nn.Module) -> None:
    """Give every layer's MLP the width `config.intermediate_sizes` lists, and a count module where
    `config.count_layers` says so (called before the weights are initialised or loaded)."""
    config = model.config
    layout = config.resolved_mlp_layout()
    blocks = fused_blocks(model, layout)
    sizes = config.intermediate_sizes
    if sizes is None:
        return
    if len(sizes) != len(blocks):
        raise ValueError(f"intermediate_sizes has {len(sizes)} entries but the model has {len(blocks)} layers")
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"every intermediate size must be at least 1, got {sizes}")
    counted = set(config.count_layers or [])
    if any(i < 0 or i >= len(blocks) for i in counted):
        raise ValueError(f"count_layers {sorted(counted)} out of range for {len(blocks)} layers")
    legacy = layout.get("format", 1) < 2
    for i, block in enumerate(blocks):
        k = int(sizes[i])
        ins = [get_path(block, p) for p in layout["inputs"]]
        out = get_path(block, layout["output"])
        if out_width(ins[0]) != k or (legacy and i in counted):
            d = out_width(out)
            for path, module in zip(layout["inputs"], ins):
                set_path(block, path, _projection(module, d, k))
            set_path(block, layout["output"], _projection(out, k, d, counted_legacy=legacy and i in counted))
        if i in counted and not legacy:
            act = get_path(block, layout["activation"])
            if not isinstance(act, CountScaledActivation):
                set_path(block, layout["activation"], CountScaledActivation(act, k))


# --- the classes ----------------------------------------------------------------------------------


def stock_heads(stock_type: str) -> dict[str, str]:
    """Auto class name -> stock class name of every Auto class transformers has for `stock_type`
    (only classes built on that type's own config class)."""
    stock_cfg = config_class_for(stock_type).stock_config_class
    heads = {}
    for name, auto in sorted(vars(modeling_auto).items()):
        mapping = getattr(auto, "_model_mapping", None) if isinstance(auto, type) else None
        names = getattr(mapping, "_model_mapping", None)
        if not isinstance(names, dict) or stock_type not in names or not hasattr(transformers, name):
            continue
        cls_name = names[stock_type]
        cls_name = cls_name[0] if isinstance(cls_name, (list, tuple)) else cls_name
        cls = getattr(transformers, cls_name, None)
        if isinstance(cls, type) and getattr(cls, "config_class", None) is stock_cfg:
            heads[name] = cls_name
    return heads


def auto_map(config) -> dict[str, str]:
    """config.json's `auto_map`: AutoConfig and every Auto class of the family -> this bundle's classes."""
    stock_cfg = type(config).stock_config_class
    stock_type = stock_cfg.model_type
    entries = {"AutoConfig": f"configuration_mlpfusion.{CLASS_PREFIX}{stock_cfg.__name__}"}
    for auto, cls_name in stock_heads(stock_type).items():
        entries[auto] = f"modeling_mlpfusion.{CLASS_PREFIX}{cls_name}"
    return entries


def write_bundle(folder: str | Path, config=None) -> list[str]:
    """Copy this bundle next to a saved checkpoint and point its config.json's `auto_map` at it."""
    folder = Path(folder)
    here = Path(__file__).resolve().parent
    for name in BUNDLE_FILES:
        shutil.copyfile(here / name, folder / name)
    cfg_path = folder / "config.json"
    if config is not None and cfg_path.is_file():
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        data["auto_map"] = auto_map(config)
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(BUNDLE_FILES)


class MLPFusionModelMixin:
    """What every fused class adds to its stock class."""

    def __init__(self, config, *args, **kwargs):
        # Some stock heads build their body with `AutoModel.from_config(config)`: let it find the fused
        # body for this config's class (transformers registers the remote classes it loads the same way).
        base = stock_heads(type(config).stock_config_class.model_type).get("AutoModel")
        if base is not None and base != self.stock_class.__name__:
            transformers.AutoModel.register(type(config), model_class_for(base), exist_ok=True)
        super().__init__(config, *args, **kwargs)

    def post_init(self):
        # Runs at the end of the stock __init__, before the weights are initialised or loaded.
        rebuild_mlps(self)
        super().post_init()

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """The stock save, plus this bundle (so the folder loads with `trust_remote_code=True` anywhere)."""
        if push_to_hub:  # save everything first, then upload, so the upload carries the bundle too
            repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
            upload = {k: kwargs.pop(k) for k in ("commit_message", "private", "token", "create_pr") if k in kwargs}
            self.save_pretrained(save_directory, *args, **kwargs)
            return self._upload_saved(save_directory, repo_id, **upload)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_bundle(save_directory, self.config)
            for hook in _hooks("SAVE_HOOKS"):
                hook(Path(save_directory), self)
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token=None, create_pr: bool = False, revision: str | None = None, max_shard_size="50GB",
                    **kwargs):
        """Upload the model with its bundle. With hf-mlpfusion importable, also its model card, through
        `mlpfusion push` (`PUSH_HOOKS`): the same checks, files and card, and no commit when nothing changed."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size)
            return self._upload_saved(tmp, repo_id, commit_message=commit_message, private=private, token=token,
                                      create_pr=create_pr, revision=revision)

    def _upload_saved(self, folder, repo_id, *, commit_message=None, private=None, token=None, create_pr=False,
                      revision=None):
        push = _hooks("PUSH_HOOKS")
        if push:
            return push[0](Path(folder), repo_id, commit_message=commit_message, private=private, token=token,
                           create_pr=create_pr, revision=revision)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or
                                 "Upload MLP-fused model", create_pr=create_pr, revision=revision)


_CLASSES: dict[str, type] = {}


def model_class_for(stock_name: str) -> type:
    """The fused class of a stock class name ("LlamaForCausalLM" -> MLPFusionLlamaForCausalLM)."""
    if stock_name not in _CLASSES:
        stock = getattr(transformers, stock_name, None)
        cfg = getattr(stock, "config_class", None)
        if not (isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel) and cfg is not None):
            raise AttributeError(f"transformers has no model class {stock_name!r}")
        name = CLASS_PREFIX + stock_name
        _CLASSES[stock_name] = type(name, (MLPFusionModelMixin, stock), {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"`{stock_name}` with MLP-fused layers (see {__name__}).",
            "config_class": config_class_for(cfg.model_type),
            "stock_class": stock,
        })
    return _CLASSES[stock_name]


def __getattr__(name: str):
    # `auto_map` names classes such as "modeling_mlpfusion.MLPFusionLlamaForCausalLM": make them on demand.
    if name.startswith(CLASS_PREFIX) and not name.endswith("Config"):
        try:
            return model_class_for(name[len(CLASS_PREFIX):])
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
