"""The file pipeline: check everything cheap -> resolve the source -> load -> fuse -> save atomically.

`compress(model_id, FusionConfig(...), output)` is what `mlpfusion compress` runs. Every option, the
output folder, the source's config.json and the headers of its weights files are checked before any
weight is loaded, so a mistake costs seconds, not a load. Loaded weights are checked against the
config (no missing, unexpected or mis-shaped tensor, no NaN; see `checks`). Output is written to a
temporary folder beside the target and renamed into place at the end (`atomic`), so an interrupted
or failed run never leaves a half-written checkpoint, the source is never replaced, and nothing is
overwritten without `overwrite`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checks, modeling
from .atomic import atomic_save, check_output, check_source, clean_stale  # noqa: F401  (public here too)
from .families import family_for, head_name, is_fused_type
from .config import DEFAULT_CALIBRATION_SAMPLES, FusionConfig
from .errors import (
    CorruptCheckpointError,
    InvalidConfigError,
    MLPFusionError,
    ModelNotFoundError,
    NetworkError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    check_interrupted,
)
from .fuse import check_data_aware_method, fuse, resolve_device
from .gguf import gguf_source, load_gguf
from .io.writer import DEFAULT_MAX_SHARD_SIZE
from .methods import DATA_AWARE_METHODS
from .sources import DEFAULT_MODEL_ID, DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE, default_model_path, local_folder  # noqa: F401


# Tokenizer / processor files copied next to the fused weights when the source has them.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class CompressResult:
    output: Path
    model: torch.nn.Module
    source: str
    widths_before: list[int]
    widths_after: list[int]
    layers: list[int]
    hidden_size: int
    parameters_before: int
    parameters_after: int
    inertia: list
    seconds: dict = field(default_factory=dict)

    @property
    def mlp_flops_ratio(self) -> float:
        """MLP multiply-adds per token after / before (2·d·p per layer; counts add p more)."""
        d = self.hidden_size
        before = sum(2 * d * p for p in self.widths_before)
        counted = set(getattr(self.model.config, "count_layers", []) or [])
        after = sum(2 * d * k + (k if i in counted else 0) for i, k in enumerate(self.widths_after))
        return after / before


def default_output(model_id: str | None, config: FusionConfig) -> Path:
    path = Path(str(model_id).rstrip("/")) if model_id is not None else None
    if path is not None and path.name in ("", ".", "..") and path.exists():
        path = path.resolve()  # `compress .` is named after the folder, as its card records it
    name = DEFAULT_MODEL_NAME if path is None else (path.stem if path.suffix.lower() == ".gguf" else path.name) or "model"
    amount = f"{config.ratio:g}" if config.intermediate_size is None else f"w{config.intermediate_size}"
    output = Path(f"{name}-mlpfusion-{amount}")
    if path is not None and path.expanduser().is_dir():  # run from inside the model (`compress .`): beside it
        folder, cwd = path.expanduser().resolve(), Path.cwd().resolve()
        if cwd == folder or folder in cwd.parents:
            return folder.parent / output
    return output


def local_source(model_id: str | None) -> Path | None:
    """The local folder `model_id` names (the built-in default for None), None for a Hub id; a path
    that looks local but is not there is an error here, so that it never becomes a Hub download."""
    if model_id is None:
        return default_model_path()
    return local_folder(model_id)


def resolve_source(model_id: str | None, *, revision: str | None = None, token: str | None = None,
                   allow_pickle: bool = False, bare_is_folder: bool = False, endpoint: str | None = None) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a Hub snapshot of the id. With
    `bare_is_folder`, a bare name (no org) the Hub cannot answer for is reported as a missing folder."""
    path = local_source(model_id)
    if path is not None:
        return path
    try:
        return _download(str(model_id), revision=revision, token=token, allow_pickle=allow_pickle, endpoint=endpoint)
    except NetworkError:
        if "/" in str(model_id) or not bare_is_folder:
            raise
        # a bare name (a legacy Hub id like "gpt2", or more likely a mistyped folder) that the Hub cannot answer for
        raise ModelNotFoundError(f"no such folder: {model_id} (and the Hub, where it would be a model id, "
                                 "is unreachable): check the name, or give a path or org/name") from None


def _download(repo_id: str, *, revision, token, allow_pickle, endpoint=None) -> Path:
    from .hub import download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]
    if allow_pickle:
        patterns.append("*.bin")
    return download(repo_id, patterns, revision=revision, token=token, endpoint=endpoint)


def check_weights(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """Refuse pickles unless opted in, and check every safetensors file is whole before loading."""
    return inspect_weights(folder, allow_pickle=allow_pickle)[0]


def inspect_weights(folder: Path, *, allow_pickle: bool = False) -> tuple[list[Path], dict | None]:
    """(weights files, {tensor: shape} from their headers, or None for pickles) of a checkpoint folder,
    every safetensors file checked to be whole and every shard of an index to be there."""
    if not (folder / "config.json").is_file():
        inner = sorted(p.parent.name for p in folder.glob("*/config.json"))  # a sentence-transformers layout
        hint = f"; the model inside is {folder / inner[0]}: compress that folder" if len(inner) == 1 else ""
        raise ModelNotFoundError(f"{folder} has no config.json: it is not a transformers checkpoint folder{hint}")
    safe = checks.safetensors_files(folder)
    if not safe:
        pickled = [p for p in PICKLED_WEIGHTS if (folder / p).exists()] + [p.name for p in folder.glob("pytorch_model-*.bin")]
        if pickled:
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{folder} only has pickled weights ({pickled[0]}); pickles can run code. Convert it to "
                    "safetensors, or pass --allow-pickle if you trust its source"
                )
            return [folder / p for p in pickled], None
        raise CorruptCheckpointError(f"{folder} has a config.json but no weights file (model.safetensors)")
    header = checks.read_headers(safe)
    checks.check_index(folder, header)
    return safe, header


def read_config(folder: Path) -> dict:
    """config.json as a dict, or a one-line error saying what is wrong with it."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({err}): fix or re-download it") from None
    except OSError as err:
        raise ModelNotFoundError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object: fix or re-download it")
    if not data.get("model_type"):
        from .families import supported

        raise UnsupportedArchitectureError(
            f"{path} has no model_type, so its architecture is unknown: add the model_type of its architecture "
            f"(one of {supported()}) or re-download it"
        )
    return data


@dataclass
class Checkpoint:
    """A checkpoint folder whose config, architecture and weights headers have been checked, not loaded yet."""

    folder: Path
    family: object
    head: str
    cls: type
    config: object
    header: dict | None  # {tensor: shape} of its safetensors files; None for pickles
    allow_pickle: bool = False

    def load(self):
        """The model, in its own dtype, with every tensor checked: missing, unexpected, mis-shaped, non-finite."""
        check_interrupted()
        with quiet_transformers():
            try:
                model, info = self.cls.from_pretrained(
                    str(self.folder), dtype="auto", use_safetensors=self.header is not None,  # pickles only when allowed and alone
                    output_loading_info=True, ignore_mismatched_sizes=True,
                )
            except MLPFusionError:
                raise
            except Exception as err:
                if "os error" in str(err) or isinstance(err, OSError):
                    raise CorruptCheckpointError(f"could not read {self.folder}: {str(err).splitlines()[0][:200]}") from None
                raise CorruptCheckpointError(
                    f"could not load {self.folder} as {self.head}: {str(err).splitlines()[0][:200]}"
                ) from None
        check_interrupted()  # a Ctrl-C that a loader thread swallowed
        checks.check_loading_info(self.folder, info, model)
        checks.check_finite(model, str(self.folder))
        model.eval()
        return model


@contextlib.contextmanager
def quiet_transformers():
    """transformers quiet (its load report and progress bars would break the one-line errors; its
    report is checked by `checks.check_loading_info` instead) and loading in the main thread, so
    that Ctrl-C is never swallowed by a loader thread pool."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    env = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = env


def open_checkpoint(folder: Path, *, allow_pickle: bool = False, fused_ok: bool = False) -> Checkpoint:
    """Every check that needs no weights: config.json, architecture and head, file integrity, and
    the tensors in the files against the model the config describes (built on the meta device)."""
    import transformers

    files, header = inspect_weights(folder, allow_pickle=allow_pickle)
    cfg_dict = read_config(folder)
    model_type = cfg_dict.get("model_type")
    family = family_for(model_type, fused_ok=fused_ok)
    head = head_name(model_type, cfg_dict.get("architectures"))
    cls = modeling.model_class_for(head) if is_fused_type(model_type) else getattr(transformers, head)
    try:
        with quiet_transformers():
            config = cls.config_class.from_pretrained(str(folder))
    except Exception as err:
        raise CorruptCheckpointError(
            f"{folder / 'config.json'} is not a valid {head} config ({str(err).splitlines()[0][:160]}): fix or re-download it"
        ) from None
    if header is not None:
        try:
            checks.check_against_config(folder, header, cls, config)
        except MLPFusionError:
            raise
        except Exception as err:  # the config cannot even build its model
            raise CorruptCheckpointError(
                f"{folder / 'config.json'} does not describe a valid {head} ({str(err).splitlines()[0][:160]}): fix or re-download it"
            ) from None
    return Checkpoint(folder, family, head, cls, config, header, allow_pickle)


def load_model(folder: Path, *, allow_pickle: bool = False, fused_ok: bool = False):
    """Load a checkpoint with the class its config names (the head is kept).

    With `fused_ok`, a checkpoint written by this tool (model_type "mlpfusion_*") loads too, with
    the package's own fused class (no remote code); without it, fusing one is refused. Every tensor
    is checked against the config, before loading (from the file headers) and after (transformers'
    loading report), and for NaN/inf: a damaged checkpoint is a `CorruptCheckpointError`.
    """
    ckpt = open_checkpoint(folder, allow_pickle=allow_pickle, fused_ok=fused_ok)
    return ckpt.load(), ckpt.family, ckpt.head


def _calibration_data(tokenizer, calibration, samples, column=None, *, where: str = "the source"):
    """The calibration texts: the built-in mix (balanced by the model's tokens), a spec of it, or the
    user's text / JSON-lines / CSV / Parquet file or folder (see `hf_mlpfusion.text`); the tokenizer is
    checked to turn that text into real tokens."""
    from .calibrate import check_tokenizer
    from .text import load_calibration

    texts = load_calibration("builtin" if calibration is None else str(calibration), column=column, limit=samples,
                             tokenizer=tokenizer)
    check_tokenizer(tokenizer, texts, where=where)
    return texts


def load_source_tokenizer(folder: Path):
    """The tokenizer saved in `folder` (local files only: never a Hub look-up)."""
    from transformers import AutoTokenizer

    from .calibrate import has_tokenizer_files

    if not has_tokenizer_files(folder):
        raise InvalidConfigError(
            f"{folder} has no tokenizer files (tokenizer.json, vocab.txt, vocab.json, tokenizer.model, ...), so its "
            "calibration text cannot be tokenised: copy the tokenizer files of the model it came from into it"
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise InvalidConfigError(
            f"calibration needs the model's tokenizer, which could not be loaded from {folder}: "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}"
        ) from None


def _calibrate(model, fused, texts, tokenizer, refit, distill_steps, seed, say, device) -> None:
    from .calibrate import calibrate

    say(f"calibrating on {len(texts)} samples")
    summary = calibrate(model, fused, texts, tokenizer, refit=refit, distill_steps=distill_steps,
                        seed=seed, progress=say, device=device)
    fused.config.mlpfusion["calibration"] = summary


def _text_name(calibration) -> str:
    """Which text calibrated, for the card: "builtin" or the file's name (never its path)."""
    return "builtin" if calibration in (None, "builtin") else Path(calibration).name


def resolve_data_aware(data_aware: bool | None, calibration, method: str) -> bool:
    """Data-aware clustering: on by default when there is calibration text and the method clusters."""
    if data_aware is None:
        return calibration is not None and method in DATA_AWARE_METHODS
    if data_aware and calibration is None:
        raise InvalidConfigError("data-aware clustering needs calibration text: add --calibration FILE or --calibration builtin")
    if data_aware:
        check_data_aware_method(method)
    return bool(data_aware)


def copy_processor_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def save_fused(model, folder: Path, *, source_dir: Path | None = None, repo_id: str | None = None,
               tokenizer=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, weights: bool = True) -> None:
    """save_pretrained (safetensors) + the remote code of custom classes + processor files
    + sentence-transformers module files + card. `weights=False`: the weights are in `folder` already
    (the streaming path wrote them; `model` is on the meta device), write everything else."""
    from .io import write_model_files, write_pretrained  # the weights through the writer streaming uses too

    with quiet_transformers():  # no progress bars: a failure stays one line
        if weights:
            write_pretrained(model, folder, max_shard_size=max_shard_size)
        else:
            write_model_files(model, folder)
        if tokenizer is not None and source_dir is None:  # a source without a folder (GGUF): its own tokenizer
            tokenizer.save_pretrained(str(folder))
    if source_dir is not None:
        copy_processor_files(source_dir, folder)
        from .sentence_transformers_files import copy_files  # modules.json, 1_Pooling/, ... of a sentence-transformers source

        copy_files(source_dir, folder)
    from .hub import write_model_card  # huggingface_hub is a core dependency: the card is always written

    write_model_card(folder, source_dir=source_dir, repo_id=repo_id)


def check_options(config: FusionConfig, *, distill_steps: int = 0, calibration=None, calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
                  data_aware: bool | None = None) -> bool:
    """Every option of a run that can be checked without the model; returns the resolved data_aware."""
    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise InvalidConfigError(f"distill steps {distill_steps!r} is not a whole number >= 0: use 0 (off) or more")
    if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) or calibration_samples < 1:
        raise InvalidConfigError(f"calibration samples {calibration_samples!r} must be a whole number >= 1")
    if calibration is not None:
        from .text import is_builtin_spec, parse_builtin_spec, require_installed

        if is_builtin_spec(str(calibration)):  # an unknown or absent source is an error now, not after loading
            require_installed(parse_builtin_spec(str(calibration)))
        elif not str(calibration).strip():  # Path("") is the current folder: never read it by accident
            raise InvalidConfigError("--calibration is empty: give a text file, a folder, a JSON-lines / CSV / "
                                     "Parquet file, or 'builtin'")
        elif not Path(calibration).exists():
            raise InvalidConfigError(f"calibration file {calibration} not found: give a text file, a folder, a JSON-lines / "
                                     "CSV / Parquet file, or 'builtin'")
    resolve_device(config.device)
    return resolve_data_aware(data_aware, calibration, config.method)


def check_plan(config: FusionConfig, family, model_config) -> None:
    """The layers and widths asked for fit the model that `model_config` describes (no weights needed)."""
    config.resolve_layers(family.num_layers(model_config))
    config.width_for(family.intermediate_size(model_config))  # a stock config has one width for every layer


def compress(model_id: str | None = None, config: FusionConfig | None = None, output: str | Path | None = None, *,
             overwrite: bool = False, allow_pickle: bool = False, revision: str | None = None,
             token: str | None = None, progress: Callable[[str], None] | None = None,
             calibration: str | Path | None = None, distill_steps: int = 0,
             calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES, data_aware: bool | None = None,
             repo_id: str | None = None, calibration_column: str | None = None,
             allocate: bool = False, base_model: str | None = None,
             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, streaming: bool | None = None,
             endpoint: str | None = None) -> CompressResult:
    """Fuse a checkpoint (folder or Hub id; None = the built-in MiniLM) and save it to `output`.

    `calibration` ("builtin" for the built-in multi-domain mix, a spec such as "builtin:-bible", or
    a text / JSON-lines / CSV / Parquet file or folder, with `calibration_column`) turns on the
    least-squares refit of each fused layer's output projection; `distill_steps` > 0 adds a short
    layer-wise distillation towards the original MLPs (count vectors stay frozen).
    `data_aware` clusters in a metric taken from the calibration text's MLP inputs (see
    `hf_mlpfusion.core.metric.DataMetric`); None (default) = on whenever there is calibration text and the
    method clusters (fusion, cluster).
    `repo_id` is the Hub repo the result is meant for (used in the model card's loading snippets).
    `allocate` chooses each fused layer's width from its measured cost on the calibration text, under
    the budget the ratio sets for all of them (`hf_mlpfusion.allocate`).
    `base_model` is the Hub id of a local source (the card's `base_model`); a Hub id source is its own.
    `max_shard_size` splits the weights into `model-0000i-of-0000n.safetensors` shards of at most that size.
    `streaming` (None = whenever it applies: safetensors files that load without renaming or casting)
    fuses a layer group at a time, never holding the whole model (`hf_mlpfusion.io.stream`), and a
    calibrated compress a block at a time (`hf_mlpfusion.io.layerwise`); same bytes.
    `endpoint` is the Hub a Hub id is downloaded from (default: HF_ENDPOINT or huggingface.co).
    """
    config = config or FusionConfig()
    say = progress or (lambda msg: None)
    # 1. every option, before anything is read
    output = Path(output) if output is not None else default_output(model_id, config)
    if calibration is None and calibration_column is not None:
        raise InvalidConfigError("--calibration-column names the text column of --calibration's data file: "
                                 "add --calibration FILE, or drop it")
    data_aware = check_options(config, distill_steps=distill_steps, calibration=calibration,
                               calibration_samples=calibration_samples, data_aware=data_aware)
    if allocate and calibration is None:
        raise InvalidConfigError("--allocate measures each layer on calibration text: add --calibration builtin (or a file)")
    from .hub import check_base_model

    base_model = check_base_model(base_model)
    # 2. the output and the source, before anything heavy: the source is never replaced
    gguf = gguf_source(model_id)
    source_dir = local_source(model_id) if gguf is None else None
    if gguf is not None or source_dir is not None:  # Hub options with a local model: refused, not ignored
        local = (f"the built-in default is the installed copy of {DEFAULT_MODEL_ID}" if model_id is None
                 else f"{model_id} is a local {'folder' if Path(model_id).expanduser().is_dir() else 'file'}")
        if revision is not None:
            raise InvalidConfigError(f"--revision picks a version of a Hub model, and {local}: drop --revision, "
                                     "or name the Hub id")
        given = [name for name, value in (("--endpoint", endpoint), ("--token", token)) if value is not None]
        if given and repo_id is None:  # nothing to download and nothing to publish
            raise InvalidConfigError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the Hub, and "
                                     f"{local}: drop {'it' if len(given) == 1 else 'them'}, or add --push-to-hub "
                                     "ORG/NAME to publish the result")
    guarded = source_dir if gguf is None else (gguf.parent if Path(model_id).expanduser().is_dir() else None)
    target = check_output(output, overwrite, source=guarded)
    seconds = {}
    if streaming is not False:  # set before anything grows the heap, whose holes would serve later layers
        from .io.stream import fix_mmap_threshold_for

        fix_mmap_threshold_for(source_dir, calibrated=calibration is not None or bool(distill_steps))

    t0 = time.perf_counter()
    texts = tokenizer = metrics = None
    if gguf is not None:  # a llama.cpp file: dequantised to a stock float32 model, with its tokenizer
        say(f"reading {gguf.name} (GGUF)")
        model, tokenizer = load_gguf(gguf)
        family = family_for(model.config.model_type, fused_ok=False)
        check_plan(config, family, model.config)
        checks.check_finite(model, gguf.name)
        if calibration is not None or distill_steps:
            texts = _calibration_data(tokenizer, calibration, calibration_samples, calibration_column, where=gguf.name)
    else:
        if source_dir is None:
            say("resolving the model")
            source_dir = resolve_source(model_id, revision=revision, token=token, allow_pickle=allow_pickle,
                                        endpoint=endpoint)
            check_source(target, source_dir)
        # 3. the checkpoint without its weights: config, architecture, file integrity, tensors vs config
        ckpt = open_checkpoint(source_dir, allow_pickle=allow_pickle)
        family = ckpt.family
        check_plan(config, family, ckpt.config)
        if calibration is not None or distill_steps:
            tokenizer = load_source_tokenizer(source_dir)
            texts = _calibration_data(tokenizer, calibration, calibration_samples, calibration_column,
                                      where=str(source_dir))
        # 4. the heavy work: a layer group at a time when it applies (`io.stream`), else the whole model
        source = model_id if model_id is not None else DEFAULT_MODEL_ID
        from .io.layerwise import Calibration
        from .io.stream import try_streaming

        cal = None if texts is None else Calibration(texts, tokenizer, refit=calibration is not None,
                                                     distill_steps=distill_steps, data_aware=data_aware,
                                                     allocate=allocate, text_name=_text_name(calibration))
        streamed = try_streaming(source_dir, config, target, streaming=streaming, source=str(source),
                                 data_free=calibration is None and not distill_steps and not data_aware,
                                 overwrite=overwrite, progress=say, repo_id=repo_id, max_shard_size=max_shard_size,
                                 base_model=base_model, calibration=cal)
        if streamed is not None:
            return streamed
        say(f"loading {source_dir}")
        model = ckpt.load()
    seconds["load"] = time.perf_counter() - t0
    device = resolve_device(config.device)  # the blocks run there for statistics, allocation and calibration

    if data_aware:
        from .calibrate import data_metrics

        t0 = time.perf_counter()
        say(f"measuring the MLP inputs on {len(texts)} samples (data-aware clustering)")
        metrics = data_metrics(model, config.resolve_layers(family.num_layers(model.config)), texts, tokenizer,
                               device=device)
        seconds["statistics"] = time.perf_counter() - t0

    allocation = None
    if allocate:
        from dataclasses import replace

        from .allocate import allocate as allocate_widths

        t0 = time.perf_counter()
        say("measuring each layer at candidate widths (allocation)")
        allocation = allocate_widths(model, config, texts, tokenizer, metrics=metrics, progress=say, device=device)
        config = replace(config, widths=allocation.widths)
        seconds["allocate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    source = model_id if model_id is not None else DEFAULT_MODEL_ID
    if gguf is not None:
        source = gguf  # a local file: fuse records its name (never its path) and no Hub base model
    fused = fuse(model, config, source=str(source), metrics=metrics, progress=say,
                 precomputed=allocation.reductions if allocation is not None else None)
    if allocation is not None:
        fused.config.mlpfusion["allocation"] = allocation.summary()
    if base_model is not None:
        fused.config.mlpfusion["base_model"] = base_model
    seconds["fuse"] = time.perf_counter() - t0
    check_interrupted()

    if texts is not None:
        t0 = time.perf_counter()
        _calibrate(model, fused, texts, tokenizer, calibration is not None, distill_steps, config.seed, say, device)
        # which text, for the card: "builtin" or the file's name (never its path)
        fused.config.mlpfusion["calibration"]["text"] = _text_name(calibration)
        seconds["calibrate"] = time.perf_counter() - t0

    checks.check_finite(fused, str(source_dir), fused=True)
    t0 = time.perf_counter()
    say(f"saving to {output}")
    written = atomic_save(lambda tmp: save_fused(fused, tmp, source_dir=source_dir, repo_id=repo_id,
                                                 tokenizer=tokenizer, max_shard_size=max_shard_size),
                          target, overwrite=overwrite)
    seconds["save"] = time.perf_counter() - t0

    meta = fused.config.mlpfusion
    return CompressResult(
        output=written,  # absolute, as the streaming routes give it
        model=fused,
        source=str(source),
        widths_before=list(meta["widths_before"]),
        widths_after=list(meta["widths_after"]),
        layers=list(meta["layers"]),
        hidden_size=family.hidden_size(model.config),
        parameters_before=meta["num_parameters_before"],
        parameters_after=meta["num_parameters_after"],
        inertia=list(meta["inertia"]),
        seconds=seconds,
    )
