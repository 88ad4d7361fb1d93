"""`mlpfusion evaluate ORIGINAL FUSED`: a thin shell over `hf_mlpfusion.evaluate.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import JsonFlag, QuietFlag, VersionFlag, console, emit_json, flag, note, progress, user_errors


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _card_target(fused: str) -> Path:
    """--card writes into FUSED: it must be a local folder written by hf-mlpfusion (checked before evaluating)."""
    from hf_mlpfusion.errors import InvalidConfigError

    from hf_mlpfusion.sources import local_folder

    folder = local_folder(fused)
    if folder is None:
        raise InvalidConfigError(f"--card writes the figures into the fused checkpoint folder, and {fused} is not a "
                                 "local folder: download it first (e.g. `hf download`), then evaluate that folder")
    if not _is_fused(folder):
        raise InvalidConfigError(f"--card needs a checkpoint written by hf-mlpfusion, and {fused} has no 'mlpfusion' "
                                 "entry in config.json: compress it first")
    return folder


def _is_fused(folder: Path) -> bool:
    """Whether `folder`'s config.json has hf-mlpfusion's entry (an unreadable one counts as not)."""
    try:
        return isinstance(json.loads((Path(folder) / "config.json").read_text()).get("mlpfusion"), dict)
    except (OSError, ValueError, AttributeError):
        return False


@user_errors
def evaluate(
    original: Annotated[str, typer.Argument(metavar="ORIGINAL", help="The original checkpoint: a folder or a Hub id.", show_default=False)],
    fused: Annotated[str, typer.Argument(metavar="FUSED", help="The fused checkpoint: a folder or a Hub id.", show_default=False)],
    text: Annotated[Optional[Path], typer.Option("--text", help="Text file, one sample per line. Default: built-in held-out English text.", show_default=False)] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Labelled CSV (text,label columns); its texts are used.", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="How many samples to evaluate on.")] = 256,
    ntk_examples: Annotated[int, typer.Option("--ntk-examples", help="Examples for the Adam-NTK error (0 = skip).")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate samples to this many tokens.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the masking and the NTK's output direction.")] = 0,
    card: Annotated[bool, flag("--card", help="Write the figures into FUSED's config.json and model card (a local folder).")] = False,
    dataset_id: Annotated[Optional[str], typer.Option("--dataset-id", help="With --card: the Hub dataset the --text/--csv samples come from; the figures then also go into the card's model-index.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token for Hub ids (default: HF_TOKEN or the stored login).", show_default=False)] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    version: VersionFlag = None,
) -> None:
    """Measure what fusion cost: output error, cosine, perplexity / MLM loss, Adam-NTK error, size, speed."""
    from hf_mlpfusion.errors import InvalidConfigError

    if text is not None and csv is not None:
        raise InvalidConfigError("give --text or --csv, not both")
    if samples < 1:
        raise InvalidConfigError("--samples must be at least 1")
    if dataset_id is not None and not card:
        raise InvalidConfigError("--dataset-id names the data of the figures --card writes: add --card")
    if dataset_id is not None and text is None and csv is None:
        raise InvalidConfigError("--dataset-id names where --text or --csv came from; the built-in text is no Hub dataset")
    target = _card_target(fused) if card else None
    if card:
        from hf_mlpfusion.hub import check_dataset_id

        check_dataset_id(dataset_id)  # before the work

    from hf_mlpfusion.compress import resolve_source
    from hf_mlpfusion.data import load_labelled_csv, load_texts
    from hf_mlpfusion.evaluate import evaluate as run_evaluate

    if text is not None:
        texts = load_texts(text, limit=samples)
    elif csv is not None:
        texts = load_labelled_csv(csv, limit=samples).texts
    else:
        texts = None
    with progress(quiet, "evaluating") as say:
        say(f"resolving {original}")
        original_dir = resolve_source(original, token=token, bare_is_folder=True)
        say(f"resolving {fused}")
        fused_dir = resolve_source(fused, token=token, bare_is_folder=True)
        if _is_fused(original_dir) and not _is_fused(fused_dir):
            raise InvalidConfigError(f"the arguments are swapped: {original} is an MLP-fused checkpoint and {fused} is "
                                     f"not; the order is ORIGINAL FUSED: run `mlpfusion evaluate {fused} {original}`")
        report = run_evaluate(original_dir, fused_dir, texts, samples=samples, ntk_examples=ntk_examples,
                              max_length=max_length, seed=seed, progress=say)
    report.original, report.fused = original, fused  # as named, not where a download was cached
    if target is not None:
        from hf_mlpfusion.hub import fidelity_record, record_fidelity, source_identity

        where = "the built-in held-out text" if texts is None else f"`{(text or csv).name}`"
        record = fidelity_record(report.to_dict(), compared_with=source_identity(original)[0], text=where,
                                 dataset_id=dataset_id)
        if not record_fidelity(target, record):
            note(f"the figures are in {target / 'config.json'}; README.md is not hf-mlpfusion's card, so it was "
                 "left alone", quiet)
    if as_json:
        emit_json(report.to_dict())
        return
    table = Table(title=f"{report.fused} vs {report.original} ({report.samples} samples, {report.tokens} tokens)")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("fused", justify="right")
    table.add_row("last hidden state, relative error", "0", _fmt(report.hidden_relative_error))
    if report.cosine_mean is not None:
        table.add_row("embedding cosine (mean / min)", "1", f"{report.cosine_mean:.4f} / {report.cosine_min:.4f}")
    if report.perplexity_before is not None:
        table.add_row("perplexity", _fmt(report.perplexity_before, ".2f"), _fmt(report.perplexity_after, ".2f"))
    if report.mlm_loss_before is not None:
        table.add_row("masked-LM loss", _fmt(report.mlm_loss_before), _fmt(report.mlm_loss_after))
    for layer, err in report.ntk_error.items():
        table.add_row(f"Adam-NTK relative error, layer {layer}", "0", _fmt(err))
    table.add_row("parameters", f"{report.parameters_before:,}", f"{report.parameters_after:,} ({report.parameter_ratio:.1%})")
    if report.latency_ratio is not None:
        table.add_row("CPU latency (ms, median)", _fmt(report.latency_before_ms, ".1f"),
                      f"{report.latency_after_ms:.1f} (x{report.latency_ratio:.2f})")
    console.print(table)
