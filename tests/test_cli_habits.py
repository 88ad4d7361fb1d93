"""CLI habits: -h/--help and --version everywhere, flags shown as flags, one-line usage errors, push in
`hf upload`'s order, --json and -q, Hub ids wherever a model is named, one network exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import HfApi
from typer.testing import CliRunner

import hf_mlpfusion
import tiny
from hf_mlpfusion.cli.main import app
from hf_mlpfusion.hub import push_folder
from hub_fixtures import WRITE_TOKEN, hub, hub_env  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
COMMANDS = ("compress", "push", "info", "evaluate")


def run(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def one_error_line(result, *needles, code=1):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    src = root / "tiny-bert"
    tiny.model("bert", "BertForMaskedLM").save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "is"]) + "\n")
    fused = root / "fused"
    assert run("compress", src, "--ratio", "0.5", "-o", fused, "-q").exit_code == 0
    return src, fused


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_and_version_everywhere(command):
    args = [command] if command else []
    for h in ("-h", "--help"):
        result = run(*args, h, env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Usage: mlpfusion" in result.stdout, result.output
        assert "<bool>" not in result.stdout  # flags are shown as flags
    version = run(*args, "--version")
    assert version.exit_code == 0 and version.stdout == f"hf-mlpfusion {hf_mlpfusion.__version__}\n"


def test_flags_take_no_value(folders, tmp_path):
    src, _ = folders
    help_text = run("compress", "-h", env={"COLUMNS": "200"}).stdout
    for name in ("--overwrite", "--fold-scale", "--allow-pickle", "--private", "--create-pr", "--json", "--quiet"):
        line = next(line for line in help_text.splitlines() if name in line)
        assert "<" not in line.split(name, 1)[1].split("  ")[0], line
    one_error_line(run("compress", src, "--overwrite", "true"), "flags take no value", "--overwrite", code=2)
    # the value taken for a positional argument: a malformed command line (2) in every command, never a look-up
    one_error_line(run("compress", "--overwrite", "true", "-o", tmp_path / "o"), "flags take no value",
                   "mlpfusion compress -h", code=2)
    assert not (tmp_path / "o").exists()
    for args in (("push", "--private", "true"), ("push", "org/name", "--create-pr", "yes"),
                 ("evaluate", "--json", "false"), ("info", "--json", "no")):
        one_error_line(run(*args), "flags take no value", f"mlpfusion {args[0]} -h", code=2)


def test_usage_errors_are_one_line(folders):
    src, _ = folders
    one_error_line(run("push"), "Missing argument 'REPO_ID'", "mlpfusion push -h", code=2)
    one_error_line(run("compress", src, "--no-such-option"), "No such option", code=2)
    one_error_line(run("info", src, "--ratio", "x"), "No such option", code=2)
    one_error_line(run("compress", src, "--ratio", "many"), "Invalid value for '--ratio'", code=2)
    no_command = run("no-such-command")
    assert no_command.exit_code == 2 and len(no_command.stderr.strip().splitlines()) == 1


def test_push_takes_the_repo_first_and_hints_when_swapped(folders, hub, tmp_path, monkeypatch):
    _, fused = folders
    repo = "my-org/habits"
    line = one_error_line(run("push", fused, repo, "--endpoint", hub.url, "--token", WRITE_TOKEN), "swapped")
    assert f"mlpfusion push {repo} {fused}" in line
    one_error_line(run("push", fused, "--endpoint", hub.url, "--token", WRITE_TOKEN), "is a folder, not a repo id")
    assert hub.state.repos == {}  # nothing was published by the mistakes
    monkeypatch.chdir(fused)  # FOLDER defaults to the current folder, as in `hf upload`
    result = run("push", repo, "--endpoint", hub.url, "--token", WRITE_TOKEN, "--json")
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)
    assert pushed["changed"] and pushed["repo_id"] == repo and pushed["folder"] == "."
    assert pushed["url"].startswith(f"{hub.url}/{repo}/commit/") and pushed["pr_url"] is None
    assert "model.safetensors" in HfApi(endpoint=hub.url, token=WRITE_TOKEN).list_repo_files(repo)
    again = run("push", repo, ".", "--endpoint", hub.url, "--token", WRITE_TOKEN, "-q")
    assert again.exit_code == 0 and again.stdout.startswith("no changes; already up to date: ") and again.stderr == ""


def test_compress_json_and_quiet(folders, tmp_path):
    src, _ = folders
    result = run("compress", src, "--ratio", "0.25", "--layers", "1", "-o", tmp_path / "j", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert summary["output"] == str(tmp_path / "j") and summary["source_model"] == "tiny-bert"
    assert summary["widths_after"] == [64, 16, 64] and summary["layers"] == [1] and summary["push"] is None
    assert summary["parameters_after"] < summary["parameters_before"] and 0 < summary["mlp_flops_ratio"] < 1
    assert set(summary["seconds"]) >= {"load", "fuse", "save"}
    quiet = run("compress", src, "--ratio", "0.25", "-o", tmp_path / "q", "-q")
    assert quiet.exit_code == 0 and quiet.stdout == f"{tmp_path / 'q'}\n" and quiet.stderr == ""


def test_info_json_and_evaluate_json_quiet(folders):
    src, fused = folders
    info = run("info", fused, "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["model_type"] == "mlpfusion_bert" and data["custom_classes"] is True
    assert data["mlpfusion"]["widths_after"] == [32, 32, 32] and "trust_remote_code=True" in data["load"]
    ev = run("evaluate", src, fused, "-n", 3, "--ntk-examples", 0, "--json", "-q")
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    assert report["samples"] == 3 and report["original"] == str(src) and ev.stderr == ""


def test_hub_ids_for_info_and_evaluate(folders, hub, tmp_path):
    src, fused = folders
    push_folder(src, "my-org/tiny-bert", token=WRITE_TOKEN, endpoint=hub.url)
    push_folder(fused, "my-org/tiny-bert-fused", token=WRITE_TOKEN, endpoint=hub.url)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE_TOKEN, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "hf_mlpfusion.cli.main"]
    info = subprocess.run([*cli, "info", "my-org/tiny-bert-fused", "--json", "-q"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    assert json.loads(info.stdout)["mlpfusion"]["source_model"] == "tiny-bert" and info.stderr == ""
    ev = subprocess.run([*cli, "evaluate", "my-org/tiny-bert", "my-org/tiny-bert-fused", "-n", "3", "--ntk-examples", "0",
                         "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    assert report["original"] == "my-org/tiny-bert" and report["fused"] == "my-org/tiny-bert-fused"
    assert report["parameters_after"] < report["parameters_before"]
    missing = subprocess.run([*cli, "info", "my-org/nothing-here"], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.startswith("error: model my-org/nothing-here not found")
    # FUSED alone: compared with the Hub model it was made from (config.json's base_model), downloaded
    from_hub = tmp_path / "from-hub"
    made = subprocess.run([*cli, "compress", "my-org/tiny-bert", "--ratio", "0.5", "-o", from_hub, "-q"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    alone = subprocess.run([*cli, "evaluate", from_hub, "-n", "3", "--ntk-examples", "0", "--json"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    alone = json.loads(alone.stdout)
    assert alone["original"] == "my-org/tiny-bert" and alone["fused"] == str(from_hub)
    assert alone["hidden_relative_error"] == report["hidden_relative_error"]  # the same pair as named above


def test_evaluate_of_the_fused_checkpoint_alone(folders, tmp_path):
    """One argument is FUSED: compared with the model its config.json names; the built-in default
    is the installed copy, no download; a local source, which it cannot name, is a one-line error."""
    from hf_mlpfusion.compress import default_model_path

    out = tmp_path / "mini"
    assert run("compress", "--layers", "5", "--ratio", "0.5", "-o", out, "-q").exit_code == 0
    shown = " ".join(run("info", out, env={"COLUMNS": "300"}).stdout.split())
    assert "not measured (run `mlpfusion evaluate FUSED --text builtin --card`)" in shown  # info's hint, which runs:
    alone = run("evaluate", out, "-n", 2, "--ntk-examples", 0, "--json")
    assert alone.exit_code == 0, alone.output
    both = run("evaluate", default_model_path(), out, "-n", 2, "--ntk-examples", 0, "--json")
    alone, both = json.loads(alone.stdout), json.loads(both.stdout)
    assert alone["original"] == "sentence-transformers/all-MiniLM-L6-v2"  # the name it records, loaded as installed
    assert alone["cosine_mean"] == both["cosine_mean"] and alone["tokens"] == both["tokens"]
    card = run("evaluate", out, "-n", 2, "--ntk-examples", 0, "--card", "-q")
    assert card.exit_code == 0, card.output
    fidelity = json.loads((out / "config.json").read_text())["mlpfusion"]["fidelity"]
    assert fidelity["compared_with"] == "sentence-transformers/all-MiniLM-L6-v2"
    src, fused = folders
    shown = " ".join(run("info", fused, env={"COLUMNS": "300"}).stdout.split())
    assert "not measured (run `mlpfusion evaluate ORIGINAL FUSED --text builtin --card`)" in shown  # no source named
    one_error_line(run("evaluate", fused), "made from a local folder or file (tiny-bert)", f"mlpfusion evaluate ORIGINAL {fused}")
    one_error_line(run("evaluate", src), "is not an MLP-fused checkpoint", "give both")
    one_error_line(run("evaluate"), "Missing argument 'FUSED'", code=2)


def test_one_network_exit_code_for_downloads_and_uploads(folders, hub_env, tmp_path, monkeypatch):
    from hub_server import HubServer

    src, fused = folders
    down = HubServer().start()
    url = down.url
    down.stop()
    monkeypatch.setattr("hf_mlpfusion.hub.time.sleep", lambda s: None)
    one_error_line(run("push", "my-org/x", fused, "--endpoint", url, "--token", WRITE_TOKEN), "cannot reach the Hub",
                   code=4)
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    for command in (["info", "some-org/some-model", "-q"], ["compress", "some-org/some-model", "-o", str(tmp_path / "o"), "-q"]):
        proc = subprocess.run([sys.executable, "-m", "hf_mlpfusion.cli.main", *command], env=env, capture_output=True,
                              text=True, timeout=300)  # a Hub that refuses connections: one line, no retry log
        assert proc.returncode == 4 and proc.stdout == "", proc.stderr[-2000:]
        assert proc.stderr.startswith("error: could not download") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    one_error_line(run("compress", "some-org/some-model", "-o", tmp_path / "o"), "could not download", code=4)
    one_error_line(run("info", "some-org/some-model"), "could not download", code=4)
    one_error_line(run("evaluate", "some-org/a", fused), "could not download", code=4)


def test_the_summary_says_what_to_run_next_and_that_command_runs(tmp_path, monkeypatch):
    import shlex

    from test_card import tiny_bert_with_tokenizer

    src = tiny_bert_with_tokenizer(tmp_path / "tiny-bert")
    for args, calibrated in (([src, "--ratio", "0.5"], False),
                             ([src, "--ratio", "0.5", "--calibration", "builtin", "--calibration-samples", "8"], True),
                             (["--layers", "5", "--ratio", "0.5"], False)):  # the built-in default
        out = tmp_path / f"out-{len(args)}-{calibrated}"
        res = run("compress", *args, "-o", out, env={"COLUMNS": "300"})
        assert res.exit_code == 0, res.output
        assert ("Data-free (the paper's method): --calibration builtin" in res.stdout) is not calibrated
        command = next(line for line in res.stdout.splitlines() if line.startswith("Measure how close it stays: "))
        argv = shlex.split(command.split(": ", 1)[1])
        assert argv[:2] == ["mlpfusion", "evaluate"] and argv[-3:] == [str(out), "--text", "builtin"]
        assert (str(src) in argv) is (args[0] == src)  # a local source is named; the built-in default need not be
        ev = run(*argv[1:], "-n", 2, "--ntk-examples", 0, "--json")
        assert ev.exit_code == 0, ev.output
        assert list(json.loads(ev.stdout)["domains"]) == ["pydoc", "bible", "wordnet", "devil", "jargon"]
    quiet = run("compress", src, "--ratio", "0.5", "-o", tmp_path / "q", "-q")
    assert quiet.stdout == f"{tmp_path / 'q'}\n"  # -q: the folder only, as before
    monkeypatch.chdir(tmp_path)  # inside the working folder, the command names paths as typed there
    res = run("compress", "tiny-bert", "--ratio", "0.5", "-o", "-rel out", env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "Measure how close it stays: mlpfusion evaluate tiny-bert './-rel out' --text builtin" in res.stdout
    ev = run("evaluate", "tiny-bert", "./-rel out", "--text", "builtin:bible", "-n", 2, "--ntk-examples", 0)
    assert ev.exit_code == 0, ev.output
    import tiny

    tiny.model("bert", "BertForMaskedLM").save_pretrained(tmp_path / "no-tokenizer")
    res = run("compress", "no-tokenizer", "--ratio", "0.5", "-o", "nt-out", env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "Measure how close" not in res.stdout  # it would fail: say what is missing instead
    assert res.stdout.rstrip().endswith("No tokenizer files in nt-out: calibration and `mlpfusion evaluate` need the "
                                        "original's (tokenizer.json, vocab.txt, ...).")
    for route in ("--in-memory", "--streaming"):  # either way the folder is named in full, as "saved to" names it
        res = run("compress", "tiny-bert", "--ratio", "0.5", "-o", f"q{route}", route, "-q")
        assert res.exit_code == 0 and res.stdout == f"{tmp_path / ('q' + route)}\n", res.output


def test_quiet_silences_notes_and_a_bad_data_file_is_one_line(tmp_path):
    from test_card import tiny_bert_with_tokenizer

    src = tiny_bert_with_tokenizer(tmp_path / "tiny-bert")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}

    def compress(*args):
        return subprocess.run([sys.executable, "-m", "hf_mlpfusion.cli.main", "compress", str(src), "--layers", "0",
                               *map(str, args)], env=env, capture_output=True, text=True, timeout=300)

    in_memory = ["--method", "sketch", "--calibration", "builtin", "--calibration-samples", 8]  # cannot stream: a note
    loud = compress(*in_memory, "-o", tmp_path / "loud")
    assert loud.returncode == 0 and "note: compressing in memory, not streaming" in loud.stderr
    quiet = compress(*in_memory, "-o", tmp_path / "quiet", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == f"{tmp_path / 'quiet'}\n"
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "header.csv").write_text("text,label\n")
    for name, needle in (("bad.jsonl", "could not read"), ("header.csv", "holds no rows")):
        for extra in ([], ["-q"]):
            res = compress("--calibration", tmp_path / name, "-o", tmp_path / "never", *extra)
            assert res.returncode == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
            assert needle in res.stderr and "An error occurred while generating" not in res.stderr
    assert not (tmp_path / "never").exists()


def test_endpoint_names_the_hub_to_download_from(folders, hub, tmp_path):
    """--endpoint is where Hub ids are read from, for every command that reads one (not only where
    compress pushes): with HF_ENDPOINT pointing nowhere, the named Hub serves info, compress, evaluate."""
    src, fused = folders
    push_folder(src, "my-org/tiny-bert", token=WRITE_TOKEN, endpoint=hub.url)
    push_folder(fused, "my-org/tiny-bert-fused", token=WRITE_TOKEN, endpoint=hub.url)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": WRITE_TOKEN, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "hf_mlpfusion.cli.main"]

    def call(*args):
        done = subprocess.run([*cli, *map(str, args), "--endpoint", hub.url], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert json.loads(call("info", "my-org/tiny-bert-fused", "--json", "-q"))["mlpfusion"]["source_model"] == "tiny-bert"
    out = tmp_path / "fused"
    call("compress", "my-org/tiny-bert", "--ratio", "0.5", "-o", out, "-q")
    assert json.loads((out / "config.json").read_text())["mlpfusion"]["base_model"] == "my-org/tiny-bert"
    report = json.loads(call("evaluate", out, "-n", "3", "--ntk-examples", "0", "--json"))  # its original, from there
    assert report["original"] == "my-org/tiny-bert" and report["parameters_after"] < report["parameters_before"]
