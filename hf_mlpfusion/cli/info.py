"""`mlpfusion info DIR`: what a fused checkpoint is, read from its config.json alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hf_mlpfusion.errors import ModelNotFoundError

from .common import console, user_errors


@user_errors
def info(folder: Annotated[Path, typer.Argument(help="A folder written by `mlpfusion compress`.")]) -> None:
    """Print what a fused checkpoint is: source, method, layers, widths, parameters, how to load it."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: give a folder written by `mlpfusion compress`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"{cfg_path} is not valid JSON ({err})") from None
    meta = cfg.get("mlpfusion")
    if not meta:
        raise ModelNotFoundError(f"{folder} is not an MLP-fused checkpoint (config.json has no 'mlpfusion' entry)")
    table = Table(show_header=False, title=f"{folder}")
    table.add_column(style="bold")
    table.add_column()
    custom = "auto_map" in cfg
    rows = [
        ("model type", f"{cfg.get('model_type')} ({'custom classes' if custom else 'stock transformers'})"),
        ("architecture", ", ".join(cfg.get("architectures") or [])),
        ("source model", str(meta.get("source_model"))),
        ("method", str(meta.get("method"))),
        ("ratio" if meta.get("ratio") is not None else "width", str(meta.get("ratio") or meta.get("intermediate_size"))),
        ("fused layers", ", ".join(map(str, meta.get("layers", [])))),
        ("widths before", " ".join(map(str, meta.get("widths_before", [])))),
        ("widths after", " ".join(map(str, meta.get("widths_after", [])))),
        ("count vector", "folded into W2" if meta.get("fold_scale") else f"frozen buffer in layers {cfg.get('count_layers', [])}"),
        ("parameters", f"{meta.get('num_parameters_before', 0):,} -> {meta.get('num_parameters_after', 0):,}"),
        ("seed", str(meta.get("seed"))),
        ("clustering", _clustering(meta)),
        ("calibration", _calibration(meta)),
        ("made with", f"hf-mlpfusion {meta.get('library_version')}, transformers {cfg.get('transformers_version')}"),
        ("load", "import hf_mlpfusion; AutoModel.from_pretrained(dir)  or  AutoModel.from_pretrained(dir, trust_remote_code=True)"
         if custom else "AutoModel.from_pretrained(dir)  (stock transformers, no custom code)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _clustering(meta: dict) -> str:
    kind = meta.get("clustering")
    if kind == "data-aware":
        return f"data-aware (MLP input statistics of {meta.get('clustering_tokens', 0):,} tokens)"
    return kind or "none (not a clustering method)"


def _calibration(meta: dict) -> str:
    cal = meta.get("calibration")
    if not cal:
        return "none (data-free)"
    steps = [s for s, on in (("refit", cal.get("refit")), (f"{cal.get('distill_steps')} distillation steps",
                                                               cal.get("distill_steps"))) if on]
    return f"{' + '.join(steps) or 'none'} on {cal.get('samples')} samples ({cal.get('tokens', 0):,} tokens)"
