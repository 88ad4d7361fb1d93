"""Custom configs and model classes for fused checkpoints.

The three families live in self-contained files (configuration_*, modeling_*, fused_mlp.py) that
import only torch and transformers: the same files are registered with the Auto classes here and
copied next to every saved checkpoint for `trust_remote_code=True`.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import transformers
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

HERE = Path(__file__).resolve().parent

# fused model_type -> (configuration module, config class, modeling module)
FAMILIES = {
    "mlpfusion_bert": ("configuration_mlpfusion_bert", "MLPFusionBertConfig", "modeling_mlpfusion_bert"),
    "mlpfusion_roberta": ("configuration_mlpfusion_roberta", "MLPFusionRobertaConfig", "modeling_mlpfusion_roberta"),
    "mlpfusion_gpt2": ("configuration_mlpfusion_gpt2", "MLPFusionGPT2Config", "modeling_mlpfusion_gpt2"),
}
SHARED_FILES = ("fused_mlp.py",)


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def config_class(model_type: str):
    cfg_mod, cfg_cls, _ = FAMILIES[model_type]
    return getattr(_module(cfg_mod), cfg_cls)


def model_class(model_type: str, class_name: str):
    return getattr(_module(FAMILIES[model_type][2]), class_name)


def auto_map(model_type: str) -> dict[str, str]:
    """The `auto_map` entry of config.json: every Auto class of the family -> its remote-code class."""
    cfg_mod, cfg_cls, mod = FAMILIES[model_type]
    entries = {"AutoConfig": f"{cfg_mod}.{cfg_cls}"}
    for auto_name, cls_name in _module(mod).AUTO_MAP.items():
        entries[auto_name] = f"{mod}.{cls_name}"
    return entries


def write_remote_code(folder: str | Path, model_type: str) -> list[str]:
    """Copy the family's source files next to a saved checkpoint and point config.json's auto_map at them."""
    folder = Path(folder)
    cfg_mod, _, mod = FAMILIES[model_type]
    names = [f"{cfg_mod}.py", f"{mod}.py", *SHARED_FILES]
    for name in names:
        shutil.copyfile(HERE / name, folder / name)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = auto_map(model_type)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return names


def register() -> None:
    """Register every fused config/model class with the transformers Auto classes (idempotent)."""
    for model_type, (_, _, mod_name) in FAMILIES.items():
        cfg_cls = config_class(model_type)
        transformers.AutoConfig.register(model_type, cfg_cls, exist_ok=True)
        mod = _module(mod_name)
        for auto_name, cls_name in mod.AUTO_MAP.items():
            getattr(transformers, auto_name).register(cfg_cls, getattr(mod, cls_name), exist_ok=True)
        # The fused family tokenises like its stock parent (BertConfig -> BertTokenizer, ...).
        stock_cfg = cfg_cls.__mro__[1]
        try:
            tokenizer = TOKENIZER_MAPPING[stock_cfg]
        except KeyError:  # pragma: no cover - every supported family has one
            continue
        transformers.AutoTokenizer.register(cfg_cls, tokenizer_class=tokenizer, exist_ok=True)
