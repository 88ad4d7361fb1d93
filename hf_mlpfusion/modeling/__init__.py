"""The fused model classes: ONE self-contained bundle for every family, and its registration.

`configuration_mlpfusion.py` and `modeling_mlpfusion.py` import only torch and transformers and
read the MLP layout from config.json; the very same files are copied next to every saved fused
checkpoint for `trust_remote_code=True`. `register_configs()`, `register_tokenizers()` and
`register_models()` register the fused classes of every supported model type with the transformers
Auto classes; `import hf_mlpfusion` runs each as soon as transformers has loaded the Auto module it
fills (`hf_mlpfusion._autoregister`).
"""

from __future__ import annotations

from pathlib import Path

from . import configuration_mlpfusion as _configuration
from . import modeling_mlpfusion as _modeling
from .configuration_mlpfusion import config_class_for, fused_model_type, stock_model_type
from .modeling_mlpfusion import (
    BUNDLE_FILES,
    PUSH_HOOKS,
    SAVE_HOOKS,
    CountScaledActivation,
    model_class_for,
    write_bundle,
)

HERE = Path(__file__).resolve().parent
_REGISTERED: set[str] = set()  # the pieces registered: "configs", "tokenizers", "models"


def _card_hook(folder, model) -> None:  # every save of a fused model: the package's model card
    from ..hub import card_save_hook

    card_save_hook(folder, model)


def _push_hook(folder, repo_id, **options) -> str:  # push_to_hub: what `mlpfusion push` does
    from ..hub import upload_saved

    return upload_saved(folder, repo_id, **options)


if _card_hook not in SAVE_HOOKS:
    SAVE_HOOKS.append(_card_hook)
if _push_hook not in PUSH_HOOKS:
    PUSH_HOOKS.append(_push_hook)


def _fused_types():
    """(family, stock model type, fused config class) of every supported model type."""
    from ..families import FAMILIES

    for family in FAMILIES.values():
        for stock in family.model_types:
            cfg_cls = config_class_for(stock)
            cfg_cls._default_mlp_layout = family.layout()  # what checkpoints of 0.1.0 (no layout saved) mean
            yield family, stock, cfg_cls


def register_configs() -> None:
    """AutoConfig: `mlpfusion_<type>` -> the fused config class (idempotent)."""
    if "configs" in _REGISTERED:
        return
    import transformers

    for _, stock, cfg_cls in _fused_types():
        transformers.AutoConfig.register(fused_model_type(stock), cfg_cls, exist_ok=True)
    _REGISTERED.add("configs")


def register_models() -> None:
    """Every Auto model class of each family: fused config class -> fused model class (idempotent)."""
    if "models" in _REGISTERED:
        return
    import transformers

    for family, stock, cfg_cls in _fused_types():
        for head, auto in family.heads(stock).items():
            if auto is not None:
                getattr(transformers, auto).register(cfg_cls, model_class_for(head), exist_ok=True)
    _REGISTERED.add("models")


def register_tokenizers() -> None:
    """AutoTokenizer: a fused model tokenises like its stock parent (BertConfig -> BertTokenizer, ...)."""
    if "tokenizers" in _REGISTERED:
        return
    import transformers
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    for _, _, cfg_cls in _fused_types():
        try:
            tokenizer = TOKENIZER_MAPPING[cfg_cls.stock_config_class]
        except KeyError:
            continue
        transformers.AutoTokenizer.register(cfg_cls, tokenizer_class=tokenizer, exist_ok=True)
    _REGISTERED.add("tokenizers")


def register() -> None:
    """Register the fused config/model/tokenizer classes of every supported model type (idempotent).

    `import hf_mlpfusion` does this by itself, piece by piece, as transformers loads its Auto modules
    (see `hf_mlpfusion._autoregister`); calling it is only needed to force it all at once."""
    register_configs()
    register_tokenizers()
    register_models()


__all__ = ["BUNDLE_FILES", "HERE", "PUSH_HOOKS", "SAVE_HOOKS", "CountScaledActivation", "config_class_for",
           "fused_model_type", "model_class_for", "register", "register_configs", "register_models",
           "register_tokenizers", "stock_model_type", "write_bundle", "_configuration", "_modeling"]
