"""`mlpfusion info MODEL`: what a fused checkpoint is, read from its config.json alone (a folder or a Hub id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hf_mlpfusion.errors import InvalidConfigError, ModelNotFoundError
from hf_mlpfusion.sources import local_folder, recorded_base_model

from .common import JsonFlag, QuietFlag, VersionFlag, console, emit_json, progress, refuse_flag_values, user_errors

LOAD_CUSTOM = "import hf_mlpfusion; AutoModel.from_pretrained(dir)  or  AutoModel.from_pretrained(dir, trust_remote_code=True)"
LOAD_STOCK = "AutoModel.from_pretrained(dir)  (stock transformers, no custom code)"


def _config_path(model: str, revision: Optional[str], token: Optional[str], endpoint: Optional[str], quiet: bool) -> Path:
    folder = local_folder(model)
    if folder is not None:
        for name, value in (("--revision", revision), ("--endpoint", endpoint), ("--token", token)):
            if value is not None:  # refused, not ignored
                raise InvalidConfigError(f"{name} is for a model on the Hub, and {model} is a local folder: "
                                         f"drop {name}, or name the Hub id")
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{model} has no config.json: give a folder written by `mlpfusion compress`, or a Hub id")
        return folder / "config.json"
    from hf_mlpfusion.hub import download_file

    with progress(quiet, f"downloading the config.json of {model}"):
        return download_file(model, "config.json", revision=revision, token=token, endpoint=endpoint)


@user_errors
def info(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A folder written by `mlpfusion compress`, or its Hub id (org/name).", show_default=False)],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Revision on the Hub.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN or the stored login).", show_default=False)] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).", show_default=False)] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    version: VersionFlag = None,
) -> None:
    """Print what a fused checkpoint is: source, method, layers, widths, parameters, how to load it."""
    refuse_flag_values(model)
    cfg_path = _config_path(model, revision, token, endpoint, quiet)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"the config.json of {model} is not valid JSON ({err})") from None
    meta = cfg.get("mlpfusion")
    if not meta:
        raise ModelNotFoundError(f"{model} is not an MLP-fused checkpoint (config.json has no 'mlpfusion' entry): "
                                 f"`mlpfusion compress {model}` makes one")
    custom = "auto_map" in cfg
    if as_json:
        emit_json({
            "model": model,
            "model_type": cfg.get("model_type"),
            "architectures": list(cfg.get("architectures") or []),
            "custom_classes": custom,
            "intermediate_sizes": cfg.get("intermediate_sizes"),
            "count_layers": cfg.get("count_layers", []),
            "transformers_version": cfg.get("transformers_version"),
            "mlpfusion": meta,
            "load": LOAD_CUSTOM if custom else LOAD_STOCK,
        })
        return
    table = Table(show_header=False, title=model)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model type", f"{cfg.get('model_type')} ({'custom classes' if custom else 'stock transformers'})"),
        ("architecture", ", ".join(cfg.get("architectures") or [])),
        ("source model", str(meta.get("source_model"))),
        ("base model (Hub)", str(meta.get("base_model") or "none recorded")),
        ("method", str(meta.get("method"))),
        ("ratio" if meta.get("ratio") is not None else "width", str(meta.get("ratio") or meta.get("intermediate_size"))),
        ("fused layers", ", ".join(map(str, meta.get("layers", [])))),
        ("widths before", " ".join(map(str, meta.get("widths_before", [])))),
        ("widths after", " ".join(map(str, meta.get("widths_after", [])))),
        ("width allocation", _allocation(meta)),
        ("count vector", "folded into W2" if meta.get("fold_scale") else f"frozen buffer in layers {cfg.get('count_layers', [])}"),
        ("parameters", f"{meta.get('num_parameters_before', 0):,} -> {meta.get('num_parameters_after', 0):,}"),
        ("seed", str(meta.get("seed"))),
        ("clustering", _clustering(meta)),
        ("calibration", _calibration(meta)),
        ("fidelity", _fidelity(meta)),
        ("made with", f"hf-mlpfusion {meta.get('library_version')}, transformers {cfg.get('transformers_version')}"),
        ("load", LOAD_CUSTOM if custom else LOAD_STOCK),
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


def _fidelity(meta: dict) -> str:
    """What `evaluate --card` recorded, in a line: the cosine (encoders) or perplexity ratio (causal
    LMs) on each text, against which model."""
    fid = meta.get("fidelity")
    if not isinstance(fid, dict):  # FUSED alone when its config names a Hub base model to compare with
        original = "" if recorded_base_model(meta) else "ORIGINAL "
        return f"not measured (run `mlpfusion evaluate {original}FUSED --text builtin --card`)"
    entries = fid["domains"] if isinstance(fid.get("domains"), list) else [{**fid, "name": fid.get("text")}]
    parts = []
    for entry in entries:
        r = entry.get("results") if isinstance(entry, dict) else None
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("cosine_mean"), (int, float)):
            value = f"cosine {r['cosine_mean']:.3f}"
        elif isinstance(r.get("perplexity_after"), (int, float)) and r.get("perplexity_before"):
            value = f"perplexity x{r['perplexity_after'] / r['perplexity_before']:.2f}"
        elif isinstance(r.get("hidden_relative_error"), (int, float)):
            value = f"hidden-state error {r['hidden_relative_error']:.3f}"
        else:
            continue
        parts.append(f"{value} on {str(entry.get('name') or 'text').replace('`', '')}")
    if not parts:
        return "recorded, without figures"
    return f"{'; '.join(parts)} (against {fid.get('compared_with')}, `mlpfusion evaluate --card`)"


def _allocation(meta: dict) -> str:
    alloc = meta.get("allocation")
    if not alloc:
        return "uniform (one width for every fused layer)"
    return (f"chosen per layer from measured cost: {alloc.get('total')} of a budget of {alloc.get('budget')} neurons "
            f"(summed refit error {alloc.get('error', 0):.4g}, uniform widths {alloc.get('error_uniform', 0):.4g})")
