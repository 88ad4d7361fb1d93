"""Saving from Python: every way a fused model gets written loads with trust_remote_code=True in a
process where hf_mlpfusion cannot be imported, and carries the package's card when it can.

Routes: fuse(...).save_pretrained, Trainer.save_model, re-saving a model loaded after
`import hf_mlpfusion`, re-saving a model loaded with trust_remote_code (with and without the
package importable), and push_to_hub (against the local Hub), which must publish what
`mlpfusion push` publishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hf_mlpfusion  # noqa: F401  (registers the auto classes)
import tiny
from blocked import blocked
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.hub import CARD_MARKER, is_own_card
from hub_fixtures import WRITE_TOKEN, hub, hub_env  # noqa: F401  (fixtures)

# one head of each MLP kind: linear pair, Conv1D pair, gated triple
KINDS = {"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
AUTO = {"BertForMaskedLM": "AutoModelForMaskedLM", "GPT2LMHeadModel": "AutoModelForCausalLM",
        "LlamaForCausalLM": "AutoModelForCausalLM"}
BUNDLE = ("configuration_mlpfusion.py", "modeling_mlpfusion.py")

BLOCK = blocked()

# argv: JSON {name: [folder or repo id, auto class, expected.safetensors, head]}, tests dir
LOAD_ALL = BLOCK + textwrap.dedent("""
    import json, torch, transformers
    sys.path.insert(0, sys.argv[2])
    from safetensors.torch import load_file
    from tiny_io import max_diff, outputs
    report = {}
    for name, (where, auto, expected, head) in json.loads(sys.argv[1]).items():
        model = getattr(transformers, auto).from_pretrained(where, trust_remote_code=True).eval()
        want = load_file(expected)
        report[name] = [type(model).__module__, max_diff(outputs(model, head), [want[str(i)] for i in range(len(want))])]
    print(json.dumps(report))
""")

# argv: JSON {source folder: [target folder, auto class]}; blocked or not, by the caller
RESAVE_REMOTE = textwrap.dedent("""
    import json, sys, transformers
    for src, (dst, auto) in json.loads(sys.argv[1]).items():
        model = getattr(transformers, auto).from_pretrained(src, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        model.save_pretrained(dst)
    print("hf_mlpfusion" in sys.modules)
""")


def _env(tmp: Path, **extra) -> dict:
    return {**os.environ, "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run(script: str, *args: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _expected(model, head: str, path: Path) -> Path:
    save_file({str(i): t.contiguous() for i, t in enumerate(tiny.outputs(model, head))}, path)
    return path


def _no_absolute_path(folder: Path, root: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            assert str(root).encode() not in f.read_bytes(), f


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread):
    """Each kind fused (from a model loaded from a local folder) and saved by each in-package route."""
    root = tmp_path_factory.mktemp("saving")
    out = {"root": root, "folders": {}, "expected": {}}
    for kind, head in KINDS.items():
        src = root / f"tiny-{kind}"
        tiny.model(kind, head).save_pretrained(src)
        original = getattr(transformers, head).from_pretrained(str(src)).eval()  # _name_or_path: an absolute path
        fused = fuse(original, FusionConfig(ratio=0.25, layers=[0, 2], seed=0)).eval()
        expected = _expected(fused, head, root / f"expected-{kind}.safetensors")
        out["expected"][kind] = expected

        fused.save_pretrained(root / f"fuse-{kind}")  # 1. fuse(...).save_pretrained
        out["folders"][f"fuse-{kind}"] = (root / f"fuse-{kind}", kind)

        reloaded = getattr(transformers, AUTO[head]).from_pretrained(root / f"fuse-{kind}")  # 2. package route
        assert type(reloaded).__module__ == "hf_mlpfusion.modeling.modeling_mlpfusion"
        reloaded.save_pretrained(root / f"resave-{kind}")
        out["folders"][f"resave-{kind}"] = (root / f"resave-{kind}", kind)
    return out


def test_every_package_save_writes_the_bundle_auto_map_and_our_card(saved):
    root = saved["root"]
    for name, (folder, kind) in saved["folders"].items():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "README.md", *BUNDLE} <= files, (name, files)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoConfig"].startswith("configuration_mlpfusion.")
        assert config["mlpfusion"]["source_model"] == f"tiny-{kind}" and config["mlpfusion"]["base_model"] is None
        assert is_own_card(folder / "README.md"), name
        _no_absolute_path(folder, root)
        card = (folder / "README.md").read_text()
        # the source folder is not known to save_pretrained: the card does not invent a licence or a Hub link
        assert "not recorded here" in card and "huggingface.co/tiny-" not in card
        assert ModelCard.load(folder / "README.md").data.base_model is None
    for kind in KINDS:  # a re-save of the same model writes the same bytes
        for f in ("config.json", "model.safetensors", "README.md", *BUNDLE):
            assert (root / f"fuse-{kind}" / f).read_bytes() == (root / f"resave-{kind}" / f).read_bytes(), (kind, f)


def test_trainer_save_model_writes_a_remote_code_checkpoint(saved, tmp_path, one_thread):
    head = KINDS["gpt2"]
    fused = transformers.AutoModelForCausalLM.from_pretrained(saved["folders"]["fuse-gpt2"][0])
    counts = {n: b.clone() for n, b in fused.named_buffers() if n.endswith("counts")}
    ids = tiny.inputs(head, batch=4)["input_ids"]
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2)
    trainer = transformers.Trainer(model=fused, args=args, train_dataset=data)
    trainer.train()
    out = tmp_path / "trained"
    trainer.save_model(str(out))
    fused.eval()
    expected = _expected(fused, head, tmp_path / "expected.safetensors")
    assert {"config.json", "model.safetensors", *BUNDLE} <= {p.name for p in out.iterdir()}
    assert is_own_card(out / "README.md")
    saved_counts = {k: v for k, v in load_file(out / "model.safetensors").items() if k.endswith("counts")}
    assert saved_counts and all(torch.equal(saved_counts[k], counts[k]) for k in counts)  # frozen, and saved
    report = json.loads(_run(LOAD_ALL, json.dumps({"trained": [str(out), "AutoModelForCausalLM", str(expected), head]}),
                             str(Path(__file__).parent), env=_env(tmp_path)))
    module, diff = report["trained"]
    assert module.startswith("transformers_modules.") and diff < 1e-5


def test_remote_code_resave_and_every_route_load_without_the_package(saved, tmp_path):
    root = saved["root"]
    jobs = {str(root / f"fuse-{kind}"): [str(tmp_path / f"remote-{kind}"), AUTO[head]] for kind, head in KINDS.items()}
    # a model loaded with trust_remote_code and re-saved, where hf_mlpfusion cannot be imported: no card, still loadable
    assert _run(BLOCK + RESAVE_REMOTE, json.dumps(jobs), env=_env(tmp_path)) == "False"
    for kind in KINDS:
        folder = tmp_path / f"remote-{kind}"
        assert {"config.json", "model.safetensors", *BUNDLE} <= {p.name for p in folder.iterdir()}
        assert not (folder / "README.md").exists()
        assert (folder / "modeling_mlpfusion.py").read_bytes() == (root / f"fuse-{kind}" / "modeling_mlpfusion.py").read_bytes()
        config = json.loads((folder / "config.json").read_text())
        assert set(config["auto_map"]) == set(json.loads((root / f"fuse-{kind}" / "config.json").read_text())["auto_map"])

    todo = {name: [str(folder), AUTO[KINDS[kind]], str(saved["expected"][kind]), KINDS[kind]]
            for name, (folder, kind) in saved["folders"].items()}
    todo.update({f"remote-{kind}": [str(tmp_path / f"remote-{kind}"), AUTO[head], str(saved["expected"][kind]), head]
                 for kind, head in KINDS.items()})
    report = json.loads(_run(LOAD_ALL, json.dumps(todo), str(Path(__file__).parent), env=_env(tmp_path)))
    assert set(report) == set(todo)
    for name, (module, diff) in report.items():
        assert module.startswith("transformers_modules."), (name, module)
        assert diff < 1e-5, (name, diff)


def test_remote_code_resave_with_the_package_importable_writes_its_card(saved, tmp_path):
    """The remote-code copy runs hf-mlpfusion's save hooks when the package can be imported."""
    root = saved["root"]
    jobs = {str(root / "fuse-bert"): [str(tmp_path / "remote-bert"), "AutoModelForMaskedLM"]}
    assert _run(RESAVE_REMOTE, json.dumps(jobs), env=_env(tmp_path)) == "True"
    folder = tmp_path / "remote-bert"
    assert is_own_card(folder / "README.md")
    assert (folder / "README.md").read_bytes() == (root / "fuse-bert" / "README.md").read_bytes()


def test_a_readme_of_the_users_own_is_left_alone_and_ours_keeps_what_it_carried(saved, tmp_path):
    fused = transformers.AutoModelForMaskedLM.from_pretrained(saved["folders"]["fuse-bert"][0])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my own card\n")
    fused.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "# my own card\n" and (mine / "model.safetensors").is_file()

    ours = tmp_path / "ours"
    fused.save_pretrained(ours)
    card = (ours / "README.md").read_text()
    (ours / "README.md").write_text(card.replace("tags:\n", "license: mit\ntags:\n", 1))  # e.g. a licence added by hand
    fused.save_pretrained(ours)  # the marker is still there: ours, rendered again, licence carried
    assert CARD_MARKER in (ours / "README.md").read_text() and ModelCard.load(ours / "README.md").data.license == "mit"
    assert "`mit` (the source model's)" in (ours / "README.md").read_text()


def test_push_to_hub_publishes_what_mlpfusion_push_publishes(saved, hub, tmp_path, monkeypatch):
    from hf_mlpfusion.cli.main import app

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    repo = "my-org/tiny-llama-mlpfusion"
    head = KINDS["llama"]
    fused = transformers.AutoModelForCausalLM.from_pretrained(saved["folders"]["fuse-llama"][0])
    url = fused.push_to_hub(repo)
    assert url.startswith(f"{hub.url}/{repo}/commit/")
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    remote = set(api.list_repo_files(repo))
    assert {"config.json", "model.safetensors", "README.md", *BUNDLE} <= remote
    card = Path(api.hf_hub_download(repo, "README.md", cache_dir=str(tmp_path / "c"))).read_text()
    assert f'AutoModel.from_pretrained("{repo}", trust_remote_code=True)' in card and "your-namespace" not in card
    commits = len(api.list_repo_commits(repo))

    # the same model saved, then published with the CLI: the same files and card, so nothing to commit
    local = tmp_path / "saved"
    fused.save_pretrained(local)
    result = CliRunner().invoke(app, ["push", repo, str(local), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["changed"] is False and len(api.list_repo_commits(repo)) == commits
    assert {p.name for p in local.iterdir()} | {".gitattributes"} == remote
    assert (local / "README.md").read_text() == card

    # and it loads from that Hub without the package
    expected = saved["expected"]["llama"]
    env = _env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_TOKEN=WRITE_TOKEN, HF_HUB_DISABLE_XET="1")
    report = json.loads(_run(LOAD_ALL, json.dumps({"hub": [repo, "AutoModelForCausalLM", str(expected), head]}),
                             str(Path(__file__).parent), env=env))
    module, diff = report["hub"]
    assert module.startswith("transformers_modules.") and diff < 1e-5


def test_a_card_that_cannot_be_written_does_not_fail_the_save(saved, tmp_path, monkeypatch):
    import hf_mlpfusion.hub as hub

    def broken(*args, **kwargs):
        raise ValueError("no template")

    monkeypatch.setattr(hub, "write_model_card", broken)
    fused = transformers.AutoModelForMaskedLM.from_pretrained(saved["folders"]["fuse-bert"][0])
    with pytest.warns(RuntimeWarning, match="could not write its model card"):
        fused.save_pretrained(tmp_path / "out")
    assert {"config.json", "model.safetensors", *BUNDLE} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert not (tmp_path / "out" / "README.md").exists()


@pytest.mark.parametrize("model_type", sorted(KINDS))
def test_a_fused_width_of_one_is_saved_and_loads(tmp_path, model_type, one_thread):
    """A width of 1 (what `--intermediate-size 1` or a tiny ratio gives) makes one-element tensor views
    at odd strides; every writer stores them, and the folder loads to the model fuse() made."""
    from hf_mlpfusion.cli.main import app

    head = KINDS[model_type]
    src = tmp_path / "src"
    original = tiny.model(model_type, head)
    original.save_pretrained(src)
    for extra, fold in (([], False), (["--in-memory"], False), (["--fold-scale"], True)):
        out = tmp_path / f"out{len(extra)}{fold}"
        res = CliRunner().invoke(app, ["compress", str(src), "--layers", "0", "--intermediate-size", "1",
                                       "-o", str(out), "-q", *extra])
        assert res.exit_code == 0, res.output
        loaded = getattr(transformers, AUTO[head]).from_pretrained(out).eval()
        want = fuse(original, FusionConfig(intermediate_size=1, layers=[0], fold_scale=fold)).eval()
        assert json.loads((out / "config.json").read_text())["intermediate_sizes"][0] == 1
        assert tiny.max_diff(tiny.outputs(loaded, head), tiny.outputs(want, head)) < 1e-5
