"""`mlpfusion evaluate ORIGINAL FUSED`: a thin shell over `hf_mlpfusion.evaluate.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, err_console, user_errors


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


@user_errors
def evaluate(
    original: Annotated[Path, typer.Argument(help="The original checkpoint folder.", show_default=False)],
    fused: Annotated[Path, typer.Argument(help="The fused checkpoint folder.", show_default=False)],
    text: Annotated[Optional[Path], typer.Option("--text", help="Text file, one sample per line. Default: built-in held-out English text.", show_default=False)] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Labelled CSV (text,label columns); its texts are used.", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="How many samples to evaluate on.")] = 256,
    ntk_examples: Annotated[int, typer.Option("--ntk-examples", help="Examples for the Adam-NTK error (0 = skip).")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate samples to this many tokens.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the masking and the NTK's output direction.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON (for machines).")] = False,
) -> None:
    """Measure what fusion cost: output error, cosine, perplexity / MLM loss, Adam-NTK error, size, speed."""
    from hf_mlpfusion.data import load_labelled_csv, load_texts
    from hf_mlpfusion.errors import InvalidConfigError
    from hf_mlpfusion.evaluate import evaluate as run_evaluate

    if text is not None and csv is not None:
        raise InvalidConfigError("give --text or --csv, not both")
    if samples < 1:
        raise InvalidConfigError("--samples must be at least 1")
    if text is not None:
        texts = load_texts(text, limit=samples)
    elif csv is not None:
        texts = load_labelled_csv(csv, limit=samples).texts
    else:
        texts = None
    with err_console.status("evaluating") as status:
        report = run_evaluate(original, fused, texts, samples=samples, ntk_examples=ntk_examples,
                              max_length=max_length, seed=seed, progress=lambda msg: status.update(msg))
    if as_json:
        print(report.to_json())
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
