"""`mlpfusion evaluate ORIGINAL FUSED`: a thin shell over `hf_mlpfusion.evaluate.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import (JsonFlag, QuietFlag, UsageError, VersionFlag, console, emit_json, flag, note, progress,
                     refuse_flag_values, user_errors)


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


def _builtin_names(specs: list[str]) -> set[str]:
    """The built-in sources the --text values name."""
    from hf_mlpfusion.text import is_builtin_spec, parse_builtin_spec

    return {name for spec in specs if is_builtin_spec(spec) for name in parse_builtin_spec(spec)}


def _card_name(name: str, builtin: set[str], *, row: bool = False) -> str:
    """How a text shows in the card (in a sentence, or as a table row): a built-in source by name, a file as given."""
    if name not in builtin:
        return f"`{name}`"
    return f"`{name}` (built-in, held out)" if row else f"the held-out split of the built-in source `{name}`"


def _print_domains(reports: dict, original: str, fused: str, as_json: bool) -> None:
    """Several texts: one row per text, then what does not depend on the text (from the first)."""
    if as_json:
        emit_json({"original": original, "fused": fused, "domains": {n: r.to_dict() for n, r in reports.items()}})
        return
    first = next(iter(reports.values()))
    cols = [(title, fn) for title, key, fn in (
        ("hidden rel. error", "hidden_relative_error", lambda r: _fmt(r.hidden_relative_error)),
        ("cosine mean / min", "cosine_mean", lambda r: f"{r.cosine_mean:.4f} / {r.cosine_min:.4f}"),
        ("perplexity (ratio)", "perplexity_after",
         lambda r: f"{r.perplexity_before:.2f} -> {r.perplexity_after:.2f} (x{r.perplexity_after / r.perplexity_before:.2f})"),
        ("masked-LM loss", "mlm_loss_after", lambda r: f"{r.mlm_loss_before:.4f} -> {r.mlm_loss_after:.4f}"),
    ) if all(getattr(r, key) is not None for r in reports.values())]
    table = Table(title=f"{fused} vs {original}, per text")
    for title in ("text", "samples", "tokens", *(t for t, _ in cols)):
        table.add_column(title, justify="left" if title == "text" else "right")
    for name, r in reports.items():
        table.add_row(name, str(r.samples), str(r.tokens), *(fn(r) for _, fn in cols))
    console.print(table)
    worst = []
    if all(r.cosine_mean is not None for r in reports.values()):
        name = min(reports, key=lambda n: reports[n].cosine_mean)
        worst.append(f"lowest cosine: {name} ({reports[name].cosine_mean:.4f})")
    if all(r.perplexity_after is not None for r in reports.values()):
        ratio = {n: r.perplexity_after / r.perplexity_before for n, r in reports.items()}
        name = max(ratio, key=ratio.get)
        worst.append(f"highest perplexity ratio: {name} (x{ratio[name]:.2f})")
    fixed = Table(title=f"the same for every text (NTK on {next(iter(reports))})")
    fixed.add_column("metric")
    fixed.add_column("original", justify="right")
    fixed.add_column("fused", justify="right")
    _fixed_rows(fixed, first)
    if worst:
        console.print("; ".join(worst), highlight=False)
    console.print(fixed)


def _fixed_rows(table: Table, report) -> None:
    """The rows that do not depend on the text: NTK per layer, parameters, latency."""
    for layer, err in report.ntk_error.items():
        table.add_row(f"Adam-NTK relative error, layer {layer}", "0", _fmt(err))
    table.add_row("parameters", f"{report.parameters_before:,}", f"{report.parameters_after:,} ({report.parameter_ratio:.1%})")
    if report.latency_ratio is not None:
        table.add_row("CPU latency (ms, median)", _fmt(report.latency_before_ms, ".1f"),
                      f"{report.latency_after_ms:.1f} (x{report.latency_ratio:.2f})")


def _is_fused(folder: Path) -> bool:
    """Whether `folder`'s config.json has hf-mlpfusion's entry (an unreadable one counts as not)."""
    try:
        return isinstance(json.loads((Path(folder) / "config.json").read_text()).get("mlpfusion"), dict)
    except (OSError, ValueError, AttributeError):
        return False


@user_errors
def evaluate(
    original: Annotated[Optional[str], typer.Argument(metavar="ORIGINAL", help="The original checkpoint: a folder, a Hub id, or the .gguf file it was compressed from. Leave it out to compare FUSED with the model its config.json says it was made from (the built-in MiniLM, or a Hub id).", show_default=False)] = None,
    fused: Annotated[Optional[str], typer.Argument(metavar="FUSED", help="The fused checkpoint: a folder or a Hub id.", show_default=False)] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", metavar="<text>", help="Text to evaluate on: a text file (one sample per line), a folder of them, a .jsonl/.csv/.parquet file, or 'builtin' / 'builtin:SOURCE,...' (the held-out split of each built-in source). Repeat it, or name several sources, for one row per text. Default: built-in held-out English text.", show_default=False)] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", help="The text column of --text's data files (default: text).", show_default=False)] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Labelled CSV (text,label columns); its texts are used.", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="How many samples to evaluate on (of each text).")] = 256,
    ntk_examples: Annotated[int, typer.Option("--ntk-examples", help="Examples for the Adam-NTK error (0 = skip).")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate samples to this many tokens.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the masking and the NTK's output direction.")] = 0,
    card: Annotated[bool, flag("--card", help="Write the figures into FUSED's config.json and model card (a local folder).")] = False,
    dataset_id: Annotated[Optional[str], typer.Option("--dataset-id", help="With --card: the Hub dataset the --text/--csv samples come from; the figures then also go into the card's model-index.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token for Hub ids (default: HF_TOKEN or the stored login).", show_default=False)] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub endpoint for Hub ids (default: HF_ENDPOINT or huggingface.co).", show_default=False)] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    version: VersionFlag = None,
) -> None:
    """Measure what fusion cost: output error, cosine, perplexity / MLM loss, Adam-NTK error, size, speed."""
    from hf_mlpfusion.errors import InvalidConfigError

    refuse_flag_values(original, fused)
    if original is None:
        raise UsageError("Missing argument 'FUSED'.")
    if fused is None:  # one argument: the fused checkpoint, against the model it was made from
        original, fused = None, original
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
    from hf_mlpfusion.data import load_labelled_csv
    from hf_mlpfusion.text import evaluation_texts

    if text_column is not None and not text:
        raise InvalidConfigError("--text-column names the text column of --text's data files: add --text")
    domains = evaluation_texts(text, column=text_column, limit=samples) if text else None
    builtin = _builtin_names(text or [])
    if dataset_id is not None and builtin:
        raise InvalidConfigError("--dataset-id names where --text came from; the built-in text is no Hub dataset")
    if domains is not None and len(domains) > 1 and dataset_id is not None:
        raise InvalidConfigError(f"--dataset-id names the one Hub dataset the figures come from, and {len(domains)} "
                                 "texts were given: evaluate that dataset's text alone with --dataset-id")
    if domains is not None and len(domains) == 1:
        (name, texts), = domains.items()
        where = _card_name(name, builtin)
        domains = None
    elif csv is not None:
        texts, where = load_labelled_csv(csv, limit=samples).texts, f"`{csv.name}`"
    else:
        texts, where = None, "the built-in held-out text"
    with progress(quiet, "evaluating") as say:
        say(f"resolving {fused}")
        fused_dir = resolve_source(fused, token=token, bare_is_folder=True, endpoint=endpoint)
        load_from = original
        if original is None:
            from hf_mlpfusion.evaluate import original_of

            original, load_from = original_of(fused_dir, fused)
        say(f"resolving {original}")
        from hf_mlpfusion.gguf import gguf_source, load_gguf

        gguf = gguf_source(load_from)
        if gguf is not None:  # a llama.cpp file, as compress reads it: dequantised to its stock model
            say(f"reading {gguf.name} (GGUF)")
            original_dir = load_gguf(gguf)[0]
        else:
            original_dir = resolve_source(load_from, token=token, bare_is_folder=True, endpoint=endpoint)
        if gguf is None and _is_fused(original_dir) and not _is_fused(fused_dir):
            raise InvalidConfigError(f"the arguments are swapped: {original} is an MLP-fused checkpoint and {fused} is "
                                     f"not; the order is ORIGINAL FUSED: run `mlpfusion evaluate {fused} {original}`")
        if domains is not None:
            from hf_mlpfusion.evaluate import evaluate_domains

            reports = evaluate_domains(original_dir, fused_dir, domains, samples=samples, ntk_examples=ntk_examples,
                                       max_length=max_length, seed=seed, progress=say)
        else:
            from hf_mlpfusion.evaluate import evaluate as run_evaluate

            reports = {None: run_evaluate(original_dir, fused_dir, texts, samples=samples, ntk_examples=ntk_examples,
                                          max_length=max_length, seed=seed, progress=say)}
    for report in reports.values():
        report.original, report.fused = original, fused  # as named, not where a download was cached
    if target is not None:
        from hf_mlpfusion.hub import domains_fidelity_record, fidelity_record, record_fidelity, source_identity

        compared_with = source_identity(original)[0]
        if domains is None:
            record = fidelity_record(reports[None].to_dict(), compared_with=compared_with, text=where,
                                     dataset_id=dataset_id)
        else:
            record = domains_fidelity_record({n: r.to_dict() for n, r in reports.items()}, compared_with=compared_with,
                                             texts={n: _card_name(n, builtin, row=True) for n in reports})
        if not record_fidelity(target, record):
            note(f"the figures are in {target / 'config.json'}; README.md is not hf-mlpfusion's card, so it was "
                 "left alone", quiet)
    if domains is not None:
        _print_domains(reports, original, fused, as_json)
        return
    report = reports[None]
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
    _fixed_rows(table, report)
    console.print(table)
