"""sentence-transformers models in, sentence-transformers models out; knows nothing of model families.

A sentence-transformers model is a folder with `modules.json`: a list of modules (Transformer,
Pooling, Normalize, Dense, ...), each with the sub-folder that holds its files. The Transformer
module is a plain transformers checkpoint plus `sentence_bert_config.json`; that is what gets
fused. This module

- finds the sentence-transformers model a checkpoint folder belongs to (`find_source`): the folder
  itself, or, when the transformer is saved in a sub-folder (`0_Transformer/`, as older
  sentence-transformers versions did), the folder above it;
- copies its module files next to a fused checkpoint (`copy_files`), adapted where they name the
  transformer: the fused weights sit in the output's root, so the Transformer entry of
  `modules.json` points at the root and its `sentence_bert_config.json` goes there;
- reads its pooling (`pooling_config`, `pooling_for`) and pools hidden states exactly as
  sentence-transformers' `Pooling` (+ `Normalize`) does (`pool`).

Only JSON and file copies: sentence-transformers need not be installed, and `torch` is imported
by `pool` alone. The copies are byte-for-byte, except `modules.json` when the transformer moves to
the root; `config_sentence_transformers.json` (its `__version__` block, prompts, similarity
function) is kept as the source has it: the module files are the source's, in the source's format.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

MODULES_FILE = "modules.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
# The Transformer module's own config; sentence-transformers reads the first that exists.
TRANSFORMER_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
# sentence-transformers' Pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_PARENT_LEVELS = 3  # how far above a transformer sub-folder to look for modules.json


class NotAdaptableError(ValueError):
    """A sentence-transformers model whose module list cannot be pointed at a fused checkpoint."""


def module_kind(type_ref: str) -> str | None:
    """"Transformer", "Pooling", "Normalize", ... for sentence-transformers' own module types
    (`sentence_transformers.models.Pooling`, `sentence_transformers.base.modules.normalize.Normalize`);
    None for custom (remote-code) modules."""
    if not isinstance(type_ref, str) or not type_ref.startswith("sentence_transformers."):
        return None
    return type_ref.rsplit(".", 1)[-1]


def _relative(path: str) -> PurePosixPath:
    if not isinstance(path, str) or "\0" in path or PureWindowsPath(path).anchor or ".." in PureWindowsPath(path).parts:
        raise NotAdaptableError(f"modules.json names the module path {path!r}: expected a relative path inside the model")
    return PurePosixPath(path.replace("\\", "/"))


@dataclass(frozen=True)
class SentenceTransformersSource:
    root: Path  # the folder with modules.json
    modules: tuple  # modules.json as read (dicts)
    transformer: int  # index into modules of the (one) Transformer module

    @property
    def transformer_path(self) -> str:
        return self.modules[self.transformer]["path"]

    @property
    def transformer_dir(self) -> Path:
        return self.root / _relative(self.transformer_path)

    def adapted_modules(self) -> list[dict]:
        """modules.json for the output, where the (fused) transformer sits in the root."""
        out = [dict(m) for m in self.modules]
        out[self.transformer]["path"] = ""
        return out


def _read_modules(root: Path) -> list[dict]:
    try:
        modules = json.loads((root / MODULES_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotAdaptableError(f"{root / MODULES_FILE} cannot be read ({err})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "path" in m and "type" in m for m in modules):
        raise NotAdaptableError(f"{root / MODULES_FILE} is not a list of modules with 'path' and 'type'")
    return modules


def _read_source(root: Path) -> SentenceTransformersSource:
    """The sentence-transformers model in `root` (which has modules.json), if it can be adapted."""
    modules = _read_modules(root)
    for m in modules:
        _relative(m["path"])
    kinds = [module_kind(m["type"]) for m in modules]
    if "Router" in kinds or "Asym" in kinds:
        raise NotAdaptableError(f"{root} routes inputs between several modules (Router): only a single Transformer is adapted")
    found = [i for i, k in enumerate(kinds) if k == "Transformer"]
    if len(found) != 1:
        what = "no sentence-transformers Transformer module" if not found else f"{len(found)} Transformer modules"
        raise NotAdaptableError(f"{root / MODULES_FILE} lists {what}: exactly one is adapted")
    return SentenceTransformersSource(root=root, modules=tuple(modules), transformer=found[0])


def find_source(checkpoint: str | Path) -> SentenceTransformersSource | None:
    """The sentence-transformers model whose Transformer module is the checkpoint folder `checkpoint`.

    None when it is not part of one (no modules.json in it or, for a transformer saved in a
    sub-folder, in the folders above). Raises NotAdaptableError when it is, but its modules cannot
    be adapted: a Router, several or no Transformer modules, paths outside the model.
    """
    checkpoint = Path(checkpoint)
    here = checkpoint.resolve()
    if (checkpoint / MODULES_FILE).is_file():
        source = _read_source(checkpoint)
        if source.transformer_dir.resolve() != here:
            raise NotAdaptableError(f"the Transformer module of {checkpoint} is in its sub-folder "
                                    f"{source.transformer_path!r}: give that folder to compress")
        return source
    for parent in list(here.parents)[:_PARENT_LEVELS]:
        if (parent / MODULES_FILE).is_file():
            try:
                source = _read_source(parent)
            except NotAdaptableError:
                return None  # a folder above that is some other model: not ours to adapt
            if source.transformer_dir.resolve() == here:
                return source
    return None


def model_type(folder: str | Path) -> str | None:
    """"SentenceTransformer", "SparseEncoder", "CrossEncoder", ... for a folder with modules.json
    (read from config_sentence_transformers.json as sentence-transformers does; absent = SentenceTransformer);
    None for a folder without modules.json."""
    folder = Path(folder)
    if not (folder / MODULES_FILE).is_file():
        return None
    try:
        config = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = {}
    return config.get("model_type", "SentenceTransformer") if isinstance(config, dict) else "SentenceTransformer"


def is_sentence_transformers(folder: str | Path) -> bool:
    """Does `folder` hold a model that `SentenceTransformer(folder)` loads as saved (not a sparse or
    cross encoder, whose files are copied all the same)?"""
    return model_type(folder) == "SentenceTransformer"


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def copy_files(checkpoint: str | Path, target: str | Path) -> list[str]:
    """Copy the sentence-transformers files of the model `checkpoint` belongs to into `target`, the
    folder of the fused checkpoint; return the paths written (relative, POSIX), [] when there are none.

    Written: modules.json (the Transformer entry pointed at the root), config_sentence_transformers.json,
    the Transformer's sentence_bert_config.json (in the root), and every file of every other module's
    folder (1_Pooling/, 2_Dense/, ...), byte for byte. A model whose modules cannot be adapted is
    warned about and left out: the output is then a plain transformers checkpoint.
    """
    checkpoint, target = Path(checkpoint), Path(target)
    try:
        source = find_source(checkpoint)
    except NotAdaptableError as err:
        warnings.warn(f"{err}; the output is a plain transformers checkpoint, not a sentence-transformers model",
                      stacklevel=2)
        return []
    if source is None:
        return []
    written = []

    def copy(src: Path, rel: PurePosixPath) -> None:
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(rel.as_posix())

    modules = source.adapted_modules()
    if modules == list(source.modules):
        copy(source.root / MODULES_FILE, PurePosixPath(MODULES_FILE))
    else:
        (target / MODULES_FILE).write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8", newline="\n")
        written.append(MODULES_FILE)
    if (source.root / MODEL_CONFIG_FILE).is_file():
        copy(source.root / MODEL_CONFIG_FILE, PurePosixPath(MODEL_CONFIG_FILE))
    for name in TRANSFORMER_CONFIG_FILES:
        if (source.transformer_dir / name).is_file():
            copy(source.transformer_dir / name, PurePosixPath(name))
            break
    transformer_dir = source.transformer_dir.resolve()
    for i, module in enumerate(source.modules):
        rel = _relative(module["path"])
        folder = source.root / rel
        if i == source.transformer or not folder.is_dir() or folder.resolve() == transformer_dir or not rel.parts:
            continue
        for f in _files_under(folder):
            copy(f, rel / PurePosixPath(f.relative_to(folder).as_posix()))
    return written


# --- pooling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolingConfig:
    """What a sentence-transformers model does with the transformer's token embeddings."""

    modes: tuple[str, ...] = ("mean",)  # concatenated in this order
    normalize: bool = False  # a Normalize module follows the Pooling
    include_prompt: bool = True
    embedding_dimension: int | None = None
    not_applied: tuple[str, ...] = ()  # modules besides Pooling and Normalize that `pool` leaves out (Dense, ...)


def parse_pooling(config: dict) -> tuple[tuple[str, ...], bool]:
    """(modes, include_prompt) of a Pooling module's config.json, old (`pooling_mode_*_tokens`) or new
    (`pooling_mode`) format, read the way sentence-transformers reads it."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key, False)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {m!r}: sentence-transformers knows {POOLING_MODES}")
    return modes, bool(config.get("include_prompt", True))


def _module_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def pooling_config(folder: str | Path) -> PoolingConfig | None:
    """The pooling of the sentence-transformers model whose Transformer module is `folder` (a source
    checkpoint, or an output of copy_files); None when it is not one, or has no Pooling module."""
    try:
        source = find_source(folder)
    except NotAdaptableError:
        return None
    if source is None:
        return None
    later = list(source.modules[source.transformer + 1:])
    at = next((i for i, m in enumerate(later) if module_kind(m["type"]) == "Pooling"), None)
    if at is None:
        return None
    pooling = _module_config(source.root / _relative(later[at]["path"]))
    modes, include_prompt = parse_pooling(pooling)
    dimension = pooling.get("embedding_dimension", pooling.get("word_embedding_dimension"))
    normalize = False
    not_applied = [module_kind(m["type"]) or m["type"] for m in later[:at]]  # on the token embeddings
    for m in later[at + 1:]:
        kind = module_kind(m["type"])
        if kind == "Normalize" and not not_applied and _normalizes_sentence_embedding(source.root, m):
            normalize = True
        else:
            not_applied.append(kind or m["type"])
    return PoolingConfig(modes=modes, normalize=normalize, include_prompt=include_prompt,
                         embedding_dimension=dimension, not_applied=tuple(not_applied))


def _normalizes_sentence_embedding(root: Path, module: dict) -> bool:
    folder = root / _relative(module["path"])
    cfg = _module_config(folder) if module["path"] and folder.is_dir() else {}
    return cfg.get("module_input_name", "sentence_embedding") == "sentence_embedding"


def pooling_for(*models) -> PoolingConfig | None:
    """The pooling of the first of `models` (checkpoint folders, or models loaded from one) that is a
    sentence-transformers model; None when none is."""
    for m in models:
        folder = m if isinstance(m, (str, Path)) else getattr(m, "name_or_path", None)
        if folder and Path(folder).is_dir():
            config = pooling_config(folder)
            if config is not None:
                return config
    return None


def pool(hidden_states, attention_mask, config: PoolingConfig | None = None):
    """Sentence embeddings [batch, dim] from token embeddings [batch, tokens, hidden], as
    sentence-transformers' Pooling then Normalize compute them for padded inputs without a prompt
    (so `include_prompt` does not matter). config None = mean pooling, not normalised."""
    import torch

    config = config or PoolingConfig()
    h = hidden_states
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:-1], dtype=torch.int64, device=h.device)
    acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    rows = torch.arange(h.shape[0], device=h.device)
    out = []
    for mode in config.modes:
        if mode == "cls":  # the first non-padding token (left padding too)
            out.append(h[rows, attention_mask.to(torch.int).argmax(dim=1)])
        elif mode == "max":
            out.append(h.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            total = (h * mask).sum(dim=1, dtype=acc)
            count = torch.clamp(mask.sum(dim=1, dtype=acc), min=1e-9)
            out.append((total / (count if mode == "mean" else torch.sqrt(count))).to(h.dtype))
        elif mode == "weightedmean":  # position weights 1, 2, ... from the first non-padding token
            mask = attention_mask.unsqueeze(-1).to(acc)
            weights = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=acc).view(1, -1, 1)
            weights = weights - attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            weighted = mask * weights
            out.append(((h * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(h.dtype))
        elif mode == "lasttoken":  # the last non-padding token
            seen, back = attention_mask.flip(1).max(1)
            back = torch.where(seen == 0, h.shape[1] - 1, back)
            out.append((h * attention_mask.unsqueeze(-1).to(h.dtype))[rows, h.shape[1] - back - 1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}: sentence-transformers knows {POOLING_MODES}")
    embedding = torch.cat(out, dim=-1)
    if config.normalize:
        embedding = torch.nn.functional.normalize(embedding, p=2, dim=-1)
    return embedding
