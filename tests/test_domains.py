"""evaluate on several domains at once: one report per domain, from the built-in held-out splits."""

import pytest

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.errors import InvalidConfigError
from hf_mlpfusion.evaluate import evaluate, evaluate_domains
from hf_mlpfusion.text import heldout_texts
from test_evaluate import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_report_per_domain_matching_a_single_evaluate(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    m = tiny.model("bert", "BertModel")
    fused = fuse(m, FusionConfig(ratio=0.25, seed=0))
    reports = evaluate_domains(m, fused, "builtin:bible,wordnet", tok, samples=8, ntk_examples=2, latency_repeats=0)
    assert list(reports) == ["bible", "wordnet"]
    assert reports["bible"].ntk_error and not reports["wordnet"].ntk_error  # the NTK once, on the first
    texts = heldout_texts(["wordnet"], limit=8)["wordnet"]
    alone = evaluate(m, fused, texts, tok, ntk_examples=0, latency_repeats=0)
    assert reports["wordnet"].cosine_mean == pytest.approx(alone.cosine_mean, abs=1e-6)
    assert reports["wordnet"].tokens == alone.tokens != reports["bible"].tokens  # each on its own text
    with pytest.raises(InvalidConfigError):
        evaluate_domains(m, fused, {}, tok)


# -- the CLI: `mlpfusion evaluate --text A --text B` / `--text builtin:...`: one row per text -------------

import json  # noqa: E402

from huggingface_hub import ModelCard  # noqa: E402

from test_card import run, tiny_bert_with_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains-cli")
    src = tiny_bert_with_tokenizer(root / "tiny-bert")
    out = root / "fused"
    assert run("compress", src, "--ratio", "0.5", "-o", out).exit_code == 0
    notes = root / "notes.txt"
    notes.write_text("the value of the object\nan instance of a class is returned\nthe name is bound to the object\n")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(
        ["a function returns a value", "the class has a name", "a module is imported", "the list is empty"])))
    return src, out, notes, rows


def test_cli_several_texts_give_one_row_each_with_the_figures_of_each_alone(pair):
    src, out, notes, rows = pair
    res = run("evaluate", src, out, "--text", notes, "--text", rows, "--text-column", "body", "--text", "builtin:bible",
              "-n", "6", "--ntk-examples", "2", "--json")
    assert res.exit_code == 0, res.output
    domains = json.loads(res.stdout)["domains"]
    assert list(domains) == ["notes.txt", "rows.jsonl", "bible"]
    assert [d["samples"] for d in domains.values()] == [3, 4, 6]  # -n is per text
    assert domains["notes.txt"]["ntk_error"] and not domains["bible"]["ntk_error"]  # the NTK once, on the first
    for name, spec in (("rows.jsonl", ["--text", rows, "--text-column", "body"]), ("bible", ["--text", "builtin:bible"])):
        alone = run("evaluate", src, out, *spec, "-n", "6", "--ntk-examples", "0", "--json")
        assert alone.exit_code == 0, alone.output
        alone = json.loads(alone.stdout)
        assert "domains" not in alone  # one text: the one report, as before
        for key in ("tokens", "hidden_relative_error", "mlm_loss_before", "mlm_loss_after", "cosine_mean"):
            assert domains[name][key] == pytest.approx(alone[key], rel=1e-6), key
    table = run("evaluate", src, out, "--text", "builtin:bible,wordnet", "-n", "4", "--ntk-examples", "0")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert any("bible" in ln and "│       4 │" in ln for ln in lines) and any("wordnet" in ln for ln in lines)
    assert "lowest cosine: " in table.output


def test_cli_card_of_several_texts_has_a_row_per_text_and_no_model_index(pair, tmp_path):
    src, out, notes, rows = pair
    res = run("evaluate", src, out, "--text", notes, "--text", "builtin:wordnet", "-n", "5", "--ntk-examples", "2",
              "--card", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["domains"]
    fid = json.loads((out / "config.json").read_text())["mlpfusion"]["fidelity"]
    assert [d["name"] for d in fid["domains"]] == ["notes.txt", "wordnet"] and fid["dataset_id"] is None
    assert fid["domains"][1]["results"]["mlm_loss_after"] == report["wordnet"]["mlm_loss_after"]
    assert "latency_before_ms" not in json.dumps(fid)  # timings depend on the machine
    assert set(fid["results"]) >= {"ntk_error", "parameters_after"} and "cosine_mean" not in fid["results"]
    card = (out / "README.md").read_text()
    w = report["wordnet"]
    assert f"| `wordnet` (built-in, held out) | {w['samples']} ({w['tokens']}) | {w['hidden_relative_error']:.4g} |" in card
    assert "| `notes.txt` | 3 (" in card and "on 2 texts, each on its own" in card
    assert "Adam-NTK relative error, layer 1 (on the first text)" in card
    assert not ModelCard.load(out / "README.md").data.eval_results
    info = run("info", out, env={"COLUMNS": "300"})
    assert info.exit_code == 0, info.output
    assert (f"cosine {report['notes.txt']['cosine_mean']:.3f} on notes.txt; cosine {w['cosine_mean']:.3f} on wordnet "
            "(against tiny-bert") in info.output
    one = run("evaluate", src, out, "--text", "builtin:bible", "-n", "3", "--ntk-examples", "0", "--card", "--json")
    bible = json.loads(one.stdout)["cosine_mean"]
    info = run("info", out, env={"COLUMNS": "300"})
    assert f"cosine {bible:.3f} on the held-out split of the built-in source bible (against" in info.output


@pytest.mark.parametrize("args,needle", [
    (["--text", "builtin:bible", "--text", "builtin:bible,wordnet"], "named twice"),
    (["--text", "builtin", "--text-column", "body"], "drop --text-column"),
    (["--text-column", "body"], "add --text"),
    (["--text", "missing.txt"], "evaluation text missing.txt not found"),
    (["--text", ""], "empty string"),
    (["--text", "builtin:nope"], "unknown text source"),
    (["--text", "NOTES", "--text", "ROWS", "--text-column", "body", "--card", "--dataset-id", "org/data"],
     "one Hub dataset"),
    (["--text", "builtin:bible", "--card", "--dataset-id", "org/data"], "no Hub dataset"),
])
def test_cli_text_mistakes_are_one_line(pair, args, needle):
    src, out, notes, rows = pair
    before = (out / "config.json").read_bytes()
    res = run("evaluate", src, out, *[{"NOTES": notes, "ROWS": rows}.get(a, a) for a in args], "-n", "2")
    assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, res.output
    assert (out / "config.json").read_bytes() == before
