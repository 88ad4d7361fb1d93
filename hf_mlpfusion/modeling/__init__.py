"""The fused model classes: ONE self-contained bundle for every family, and its registration.

`configuration_mlpfusion.py` and `modeling_mlpfusion.py` import only torch and transformers and
read the MLP layout from config.json; the very same files are copied next to every saved fused
checkpoint for `trust_remote_code=True`. `register()` (run by `import hf_mlpfusion`) registers the
fused classes of every supported model type with the transformers Auto classes.
"""

from __future__ import annotations

from pathlib import Path

from . import configuration_mlpfusion as _configuration
from . import modeling_mlpfusion as _modeling
from .configuration_mlpfusion import config_class_for, fused_model_type, stock_model_type
from .modeling_mlpfusion import BUNDLE_FILES, SAVE_HOOKS, CountScaledActivation, model_class_for, write_bundle

HERE = Path(__file__).resolve().parent
_REGISTERED = False


def register() -> None:
    """Register the fused config/model/tokenizer classes of every supported model type (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import transformers
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from ..families import FAMILIES

    for family in FAMILIES.values():
        for stock in family.model_types:
            cfg_cls = config_class_for(stock)
            cfg_cls._default_mlp_layout = family.layout()  # what checkpoints of 0.1.0 (no layout saved) mean
            transformers.AutoConfig.register(fused_model_type(stock), cfg_cls, exist_ok=True)
            for head, auto in family.heads(stock).items():
                if auto is not None:
                    getattr(transformers, auto).register(cfg_cls, model_class_for(head), exist_ok=True)
            try:  # the fused model tokenises like its stock parent (BertConfig -> BertTokenizer, ...)
                tokenizer = TOKENIZER_MAPPING[cfg_cls.stock_config_class]
            except KeyError:
                continue
            transformers.AutoTokenizer.register(cfg_cls, tokenizer_class=tokenizer, exist_ok=True)
    _REGISTERED = True


__all__ = ["BUNDLE_FILES", "HERE", "SAVE_HOOKS", "CountScaledActivation", "config_class_for", "fused_model_type",
           "model_class_for", "register", "stock_model_type", "write_bundle", "_configuration", "_modeling"]
