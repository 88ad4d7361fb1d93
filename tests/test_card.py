"""The model card and what config.json records about the source: honest and deterministic.

- a local source is recorded by its folder name, never a path, and is no `base_model`;
- `base_model` only for a real Hub id (the source itself, or `--base-model`); no base_model_relation;
- two compresses of the same model from two folders give the same bytes (the CLI, end to end);
- the method is described as what it is; calibration and `evaluate --card` figures are in the card
  (and in `model-index` for an evaluation on a named Hub dataset);
- `mlpfusion push` fills the repo id into the card.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from typer.testing import CliRunner

import hf_mlpfusion  # noqa: F401
import tiny
from hf_mlpfusion.cli.main import app
from hf_mlpfusion.hub import CARD_MARKER, push_folder, render_model_card, source_identity, write_model_card
from hf_mlpfusion.methods import METHODS
from hub_fixtures import WRITE_TOKEN, hub, hub_env  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def tiny_bert_with_tokenizer(folder: Path) -> Path:
    """A tiny BertForMaskedLM with a real WordPiece vocabulary (the calibration and evaluate need one)."""
    from transformers import BertTokenizer

    from hf_mlpfusion.data import load_texts

    words = sorted({w for t in load_texts(None, split="calibration", limit=64) for w in t.lower().split() if w.isalpha()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[: tiny.VOCAB - 5]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    tiny.model("bert", "BertForMaskedLM").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return tiny_bert_with_tokenizer(tmp_path_factory.mktemp("models") / "tiny-bert")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the source ----------------------------------------------------------------------------------


def test_source_identity(tmp_path, monkeypatch):
    (tmp_path / "tiny" / "gpt2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert source_identity("tiny/gpt2") == ("gpt2", None)  # a relative local folder, not the Hub id tiny/gpt2
    assert source_identity(tmp_path / "tiny" / "gpt2") == ("gpt2", None)
    assert source_identity(".") == (tmp_path.name, None)
    assert source_identity("openai-community/gpt2") == ("openai-community/gpt2", "openai-community/gpt2")
    assert source_identity("gpt2") == ("gpt2", "gpt2")  # not a local folder: a (canonical) Hub id
    assert source_identity("/gone/away/model") == ("model", None)  # a path that no longer exists: its name only
    assert source_identity("./missing") == ("missing", None)
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert source_identity(snapshot) == ("org/name", "org/name")  # a snapshot in the HF cache is that Hub model
    assert source_identity(None) == ("", None)


def test_the_builtin_default_named_by_its_path_is_the_model_named_by_nothing(tmp_path):
    """`compress` and `compress <the installed default's folder>` are the same model: the same
    source (the Hub's all-MiniLM-L6-v2, its base model) and the same bytes, card included."""
    from hf_mlpfusion import FusionConfig
    from hf_mlpfusion.compress import compress, default_model_path

    path = default_model_path()
    assert source_identity(path) == ("sentence-transformers/all-MiniLM-L6-v2",) * 2
    config = FusionConfig(ratio=0.5, layers=[5])
    compress(None, config, tmp_path / "unnamed")
    compress(str(path), config, tmp_path / "named")
    assert files_of(tmp_path / "named") == files_of(tmp_path / "unnamed")
    meta = json.loads((tmp_path / "named" / "config.json").read_text())["mlpfusion"]
    assert meta["base_model"] == meta["source_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_same_model_from_two_folders_gives_the_same_bytes(src, tmp_path, monkeypatch):
    """The same model in two places, named once by an absolute and once by a relative path, from two working
    folders, calibrated: every output file is byte-identical and no path is in any of them."""
    a, b = tmp_path / "one" / "tiny-bert", tmp_path / "two" / "deeper" / "tiny-bert"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    settings = ["--ratio", "0.5", "--calibration", "builtin", "--calibration-samples", "8", "--seed", "1"]
    assert run("compress", a, "-o", tmp_path / "out-a", *settings).exit_code == 0
    monkeypatch.chdir(tmp_path / "two")
    result = run("compress", "deeper/tiny-bert", "-o", "out-b", *settings)
    assert result.exit_code == 0, result.output
    out_a, out_b = files_of(tmp_path / "out-a"), files_of(tmp_path / "two" / "out-b")
    assert out_a.keys() == out_b.keys() and {"README.md", "config.json", "model.safetensors"} <= out_a.keys()
    for name in out_a:
        assert out_a[name] == out_b[name], name
        assert str(tmp_path).encode() not in out_a[name], name
    meta = json.loads(out_a["config.json"])["mlpfusion"]
    assert meta["source_model"] == "tiny-bert" and meta["base_model"] is None
    assert meta["calibration"]["text"] == "builtin"


def test_a_relative_local_path_is_no_base_model(src, tmp_path, monkeypatch):
    shutil.copytree(src, tmp_path / "tiny" / "gpt2")  # the example: a folder that looks like a Hub id
    monkeypatch.chdir(tmp_path)
    assert run("compress", "tiny/gpt2", "--ratio", "0.5", "-o", "out").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.base_model is None and "huggingface.co/tiny" not in card
    assert "`gpt2` (a local folder" in card
    assert "base_model_relation" not in card


def test_base_model_option_names_the_hub_model(src, tmp_path):
    result = run("compress", src, "--ratio", "0.5", "-o", tmp_path / "out", "--base-model", "my-org/tiny-bert")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.base_model == "my-org/tiny-bert" and "(https://huggingface.co/my-org/tiny-bert)" in card
    assert "base_model_relation" not in data.to_dict()  # none of the Hub's relations is a structural compression
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlpfusion"]["base_model"] == "my-org/tiny-bert"
    bad = run("compress", src, "-o", tmp_path / "never", "--base-model", "./not/a/hub/id")
    assert bad.exit_code == 1 and "not a Hub model id" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "never").exists()


def test_a_hub_source_is_its_own_base_model(src, hub, tmp_path):
    push_folder(src, "my-org/tiny-bert", token=WRITE_TOKEN, endpoint=hub.url)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE_TOKEN, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hf_mlpfusion.cli.main", "compress", "my-org/tiny-bert", "--ratio", "0.5",
                           "-o", str(out), "--json", "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["source_model"] == summary["base_model"] == "my-org/tiny-bert"
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == "my-org/tiny-bert"
    assert str(tmp_path).encode() not in (out / "config.json").read_bytes()  # not the snapshot's path either


# -- the method ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_card_describes_the_method_that_made_it(src, tmp_path, method):
    result = run("compress", src, "--ratio", "0.5", "--method", method, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert METHODS[method].description in card
    fusion_text = "clusters the sub-MLPs of a layer with k-means"
    if method == "fusion":
        assert "made smaller with **MLP fusion**" in card and fusion_text in card
    else:
        assert f"the **`{method}`** baseline" in card and "not MLP fusion itself" in card
        assert fusion_text not in card and "made smaller with **MLP fusion**" not in card
    if method in ("prune", "sketch"):
        assert "k-means" not in card.split("## How to load it")[0]  # no k-means row, no inertia claims


# -- fidelity ------------------------------------------------------------------------------------


def test_calibration_figures_are_in_the_card(src, tmp_path):
    result = run("compress", src, "--ratio", "0.5", "--layers", "0,2", "--calibration", "builtin",
                 "--calibration-samples", "8", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["mlpfusion"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Fidelity" in card and "8 samples" in card and "of the built-in text" in card
    for entry in meta["calibration"]["layers"]:
        row = f"| {entry['layer']} | {entry['error_before']:.4g} | {entry['error_after']:.4g} |"
        assert row in card
    assert "model-index" not in card  # the calibration text is the fit's own data, not an evaluation


def test_evaluate_card_writes_the_figures_and_model_index_only_for_a_hub_dataset(src, tmp_path):
    out = tmp_path / "out"
    assert run("compress", src, "--ratio", "0.5", "-o", out).exit_code == 0
    text = tmp_path / "sample.txt"
    text.write_text("the value of the object\nan instance of a class is returned\nthe name is bound to the object\n")
    res = run("evaluate", src, out, "--text", text, "--ntk-examples", 2, "--card", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    meta = json.loads((out / "config.json").read_text())["mlpfusion"]
    fid = meta["fidelity"]
    assert fid["compared_with"] == "tiny-bert" and fid["text"] == "`sample.txt`" and fid["samples"] == 3
    assert fid["results"]["mlm_loss_after"] == report["mlm_loss_after"]
    assert "latency_before_ms" not in fid["results"]  # timings depend on the machine: never in the card
    card = (out / "README.md").read_text()
    assert f"| masked-LM loss | {report['mlm_loss_before']:.4g} | {report['mlm_loss_after']:.4g} |" in card
    assert "Adam-NTK relative error, layer 1" in card and "model-index" not in card  # sample.txt is no Hub dataset
    first = card

    again = run("evaluate", src, out, "--text", text, "--ntk-examples", 2, "--card", "--dataset-id", "my-org/texts")
    assert again.exit_code == 0, again.output
    data = ModelCard.load(out / "README.md").data
    metrics = {r.metric_type: r for r in data.eval_results}
    assert set(metrics) == {"loss", "cosine_similarity", "relative_error"}
    assert all(r.dataset_type == "my-org/texts" and r.task_type == "fill-mask" for r in metrics.values())
    assert metrics["loss"].metric_value == round(report["mlm_loss_after"], 6)
    body = lambda card: card.split("## Fidelity")[0].rsplit("\n---\n", 1)[-1]  # noqa: E731  (below the metadata)
    assert body(first) == body((out / "README.md").read_text())  # only the metadata gained the model-index

    for args, needle in ((["--dataset-id", "my-org/texts"], "add --card"),
                         (["--card", "--dataset-id", "my-org/texts"], "no Hub dataset"),
                         (["--card", "--text", text, "--dataset-id", "../x"], "not a Hub dataset id")):
        bad = run("evaluate", src, out, *args)
        assert bad.exit_code == 1 and needle in bad.output and "Traceback" not in bad.output, bad.output
    not_fused = run("evaluate", src, src, "--card")
    assert not_fused.exit_code == 1 and "compress it first" in not_fused.output


def test_rendering_is_a_function_of_config_and_card(src, tmp_path):
    """Re-rendering an hf-mlpfusion card from its own folder gives the same bytes (licence and tags carried)."""
    assert run("compress", src, "--ratio", "0.5", "-o", tmp_path / "out").exit_code == 0
    readme = tmp_path / "out" / "README.md"
    readme.write_text(readme.read_text().replace("tags:\n", "language: en\nlicense: apache-2.0\ntags:\n- my-tag\n", 1))
    once = write_model_card(tmp_path / "out").read_bytes()
    twice = write_model_card(tmp_path / "out").read_bytes()
    assert once == twice and CARD_MARKER.encode() in once
    data = ModelCard.load(readme).data
    assert data.license == "apache-2.0" and data.language == "en" and "my-tag" in data.tags
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert str(render_model_card(config)) == str(render_model_card(json.loads(json.dumps(config))))


# -- push ----------------------------------------------------------------------------------------


def test_push_fills_the_repo_id_into_the_card(src, hub, tmp_path):
    out = tmp_path / "out"
    assert run("compress", src, "--ratio", "0.5", "-o", out).exit_code == 0
    assert "your-namespace/tiny-bert-mlpfusion-0.5" in (out / "README.md").read_text()
    repo = "my-org/tiny-bert-fused"
    result = run("push", repo, out, "--endpoint", hub.url, "--token", WRITE_TOKEN)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "your-namespace" not in card and f'AutoModel.from_pretrained("{repo}")' in card
    assert card.count("# tiny-bert-fused") == 1
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    remote = Path(api.hf_hub_download(repo, "README.md", cache_dir=str(tmp_path / "c"))).read_text()
    assert remote == card  # what is pushed is what the folder holds
    # a later re-render (a re-save into the folder, evaluate --card) keeps naming the repo
    write_model_card(out)
    assert (out / "README.md").read_text() == card


def test_a_card_for_a_checkpoint_of_release_0_1_0_invents_no_hub_link():
    """0.1.0 recorded the source as given ("tiny/gpt2", a relative folder) and nothing about its kind."""
    folder = Path(__file__).parent / "fixtures" / "v0_1_0" / "gpt2"
    config = json.loads((folder / "config.json").read_text())
    assert config["mlpfusion"]["source_model"] == "tiny/gpt2" and "base_model" not in config["mlpfusion"]
    card = str(render_model_card(config))
    assert "base_model:" not in card and "huggingface.co/tiny" not in card
    assert "`tiny/gpt2` (as hf-mlpfusion 0.1.0 recorded it; whether that is a Hub id was not recorded)" in card
