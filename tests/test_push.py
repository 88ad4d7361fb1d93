"""Publishing through the real huggingface_hub client against the fake Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from hub_fixtures import (  # noqa: F401  (fixtures)
    OTHER_WRITE_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
    hub,
    hub_env,
    make_checkpoint,
    tiny_checkpoint,
)
from hub_server import HubServer
from typer.testing import CliRunner

from hf_mlpfusion import hub as hubmod
from hf_mlpfusion.hub import (
    HubAuthError,
    HubError,
    HubNetworkError,
    check_write_access,
    pipeline_tag_for,
    push_folder,
    write_model_card,
)

from hf_mlpfusion.cli.push import push as push_command

REPO = "my-org/tiny-mlpfusion"


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def commits(hub, repo=REPO, rev="main") -> int:
    return len(HfApi(endpoint=hub.url, token=WRITE_TOKEN).list_repo_commits(repo, revision=rev))


@pytest.fixture
def no_sleep(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(hubmod.time, "sleep", waits.append)
    return waits


# -- push ----------------------------------------------------------------------------------------


def test_push_creates_repo_with_regular_and_lfs_files_then_repush_is_a_noop(hub, tiny_checkpoint):
    result = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url)
    assert result.changed and result.pr_url is None
    assert result.url == result.commit_url and result.url.startswith(f"{hub.url}/{REPO}/commit/")
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    siblings = {s.rfilename: s for s in api.repo_info(REPO, files_metadata=True).siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    assert siblings["model.safetensors"].lfs is not None  # LFS batch API + upload + verify
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(
        (tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert siblings["config.json"].lfs is None and siblings["README.md"].lfs is None  # regular, inline base64
    n = commits(hub)

    again = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url)
    assert not again.changed and commits(hub) == n
    assert again.url == result.commit_url  # points at the commit that already holds these files
    assert hubmod.describe(again).startswith("no changes; already up to date: ")

    # same model, settings and seed -> byte-identical files -> still no new commit
    rebuilt = make_checkpoint(tiny_checkpoint.parent / "rebuilt", with_card=True)
    assert not push_folder(rebuilt, REPO, token=WRITE_TOKEN, endpoint=hub.url).changed and commits(hub) == n
    assert snapshot(rebuilt) == snapshot(tiny_checkpoint)  # push filled the same repo id into both cards

    # a different seed changes the weights: one new commit, only the changed file is sent
    other = make_checkpoint(tiny_checkpoint.parent / "seed1", seed=1, with_card=True)
    changed = push_folder(other, REPO, token=WRITE_TOKEN, endpoint=hub.url, commit_message="seed 1")
    assert changed.changed and commits(hub) == n + 1
    assert HfApi(endpoint=hub.url, token=WRITE_TOKEN).list_repo_commits(REPO)[0].title == "seed 1"


def test_push_create_pr_leaves_main_alone(hub, tiny_checkpoint):
    first = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url)
    n = commits(hub)
    # nothing differs from main: no PR is opened
    same = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url, create_pr=True)
    assert not same.changed and same.pr_url is None

    write_model_card(tiny_checkpoint, fidelity={"output_relative_error": 0.0123})
    pr = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url, create_pr=True)
    assert pr.changed and pr.pr_url == f"{hub.url}/{REPO}/discussions/1" and pr.url == pr.pr_url
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    assert commits(hub) == n and api.repo_info(REPO).sha == first.commit_url.rsplit("/", 1)[-1]
    card = api.hf_hub_download(REPO, "README.md", revision="refs/pr/1", cache_dir=str(tiny_checkpoint.parent / "c"))
    assert "0.0123" in Path(card).read_text()


def test_push_to_a_new_branch_with_revision(hub, tiny_checkpoint):
    result = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url, revision="dev")
    assert result.changed
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    assert "model.safetensors" in api.list_repo_files(REPO, revision="dev")
    assert "model.safetensors" not in api.list_repo_files(REPO)  # main untouched


def test_private_repo(hub, tiny_checkpoint):
    push_folder(tiny_checkpoint, "alice/secret-model", token=WRITE_TOKEN, endpoint=hub.url, private=True)
    assert HfApi(endpoint=hub.url, token=WRITE_TOKEN).repo_info("alice/secret-model").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).repo_info("alice/secret-model")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=OTHER_WRITE_TOKEN).repo_info("alice/secret-model")


def test_repo_id_without_namespace_goes_to_the_user(hub, tiny_checkpoint):
    result = push_folder(tiny_checkpoint, "plain-name", token=WRITE_TOKEN, endpoint=hub.url)
    assert result.repo_id == "alice/plain-name" and "alice/plain-name" in hub.state.repos


# -- fail fast -----------------------------------------------------------------------------------


def test_bad_missing_and_read_only_tokens_fail_fast(hub, tiny_checkpoint):
    with pytest.raises(HubAuthError, match="401"):
        check_write_access(REPO, token="hf_wrong", endpoint=hub.url)
    with pytest.raises(HubAuthError, match="no Hugging Face token"):
        check_write_access(REPO, endpoint=hub.url)
    with pytest.raises(HubAuthError, match="read-only"):
        check_write_access(REPO, token=READ_TOKEN, endpoint=hub.url)
    with pytest.raises(HubAuthError, match="namespace 'my-org'"):
        check_write_access(REPO, token=OTHER_WRITE_TOKEN, endpoint=hub.url)
    assert check_write_access(REPO, token=WRITE_TOKEN, endpoint=hub.url) == "alice"

    with pytest.raises(HubAuthError) as err:
        push_folder(tiny_checkpoint, REPO, token="hf_wrong", endpoint=hub.url)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    assert hub.state.repos == {}  # nothing was created


def test_token_comes_from_hf_token_then_stored_login(hub, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert check_write_access(REPO, endpoint=hub.url) == "alice"
    monkeypatch.delenv("HF_TOKEN")
    (hub_env / "token").write_text(WRITE_TOKEN)
    assert check_write_access(REPO, endpoint=hub.url) == "alice"
    # --token wins over both
    with pytest.raises(HubAuthError):
        check_write_access(REPO, token="hf_wrong", endpoint=hub.url)


def test_server_down_is_a_clear_network_error_and_keeps_the_folder(hub_env, tiny_checkpoint, no_sleep):
    server = HubServer().start()
    url = server.url
    server.stop()
    before = snapshot(tiny_checkpoint)
    with pytest.raises(HubNetworkError) as err:
        push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=url, retries=3, backoff=0.5)
    message = str(err.value)
    assert f"mlpfusion push {REPO} {tiny_checkpoint}" in message and "kept" in message and "\n" not in message
    assert err.value.exit_code == 4
    assert no_sleep == [0.5, 1.0, 2.0]  # exponential back-off between the 4 attempts
    assert snapshot(tiny_checkpoint) == before
    with pytest.raises(HubNetworkError):
        check_write_access(REPO, token=WRITE_TOKEN, endpoint=url)


def test_transient_503_is_retried(hub, tiny_checkpoint, no_sleep):
    hub.state.fail_next = 2
    result = push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url, backoff=0.25)
    assert result.changed and no_sleep == [0.25, 0.5]


def test_not_a_folder_is_a_user_error(hub, tmp_path):
    with pytest.raises(HubError) as err:
        push_folder(tmp_path / "missing", REPO, token=WRITE_TOKEN, endpoint=hub.url)
    assert err.value.exit_code == 1 and not isinstance(err.value, (HubAuthError, HubNetworkError))


def test_a_folder_that_is_no_checkpoint_is_refused_before_any_request(tmp_path):
    down = HubServer().start()
    url = down.url
    down.stop()  # were a request made, it would be a network error (exit 4), not exit 1
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "todo.txt").write_text("not a model\n")
    with pytest.raises(HubError, match="has no config.json, so it is not a checkpoint folder") as err:
        push_folder(notes, REPO, token=WRITE_TOKEN, endpoint=url, retries=0)
    assert err.value.exit_code == 1 and not isinstance(err.value, (HubAuthError, HubNetworkError))
    assert sorted(p.name for p in notes.rglob("*")) == ["sub", "todo.txt"]  # nothing written into it


# -- CLI -----------------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("push")(push_command)
    app.command("noop")(lambda: None)  # keep `push` a sub-command, as in the real app
    return app


def test_cli_push_exit_codes_and_output(hub, tiny_checkpoint, no_sleep):
    runner, app = CliRunner(), cli_app()
    args = ["push", REPO, str(tiny_checkpoint), "--endpoint", hub.url, "--token", WRITE_TOKEN]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip().startswith(f"{hub.url}/{REPO}/commit/")
    again = runner.invoke(app, args + ["--commit-message", "again"])
    assert again.exit_code == 0 and again.stdout.startswith("no changes; already up to date:")

    bad = runner.invoke(app, ["push", REPO, str(tiny_checkpoint), "--endpoint", hub.url, "--token", "hf_wrong"])
    assert bad.exit_code == 3 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr

    down = HubServer().start()
    down_url = down.url
    down.stop()
    offline = runner.invoke(app, ["push", REPO, str(tiny_checkpoint), "--endpoint", down_url, "--token", WRITE_TOKEN])
    assert offline.exit_code == 4 and "mlpfusion push" in offline.stderr

    write_model_card(tiny_checkpoint, fidelity={"cosine": 0.99})
    pr = runner.invoke(app, args + ["--create-pr", "--private"])
    assert pr.exit_code == 0 and pr.stdout.strip() == f"{hub.url}/{REPO}/discussions/1"


def test_cli_uses_hf_token_from_the_environment(hub, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = CliRunner().invoke(cli_app(), ["push", REPO, str(tiny_checkpoint)])
    assert result.exit_code == 0 and REPO in result.stdout


# -- model card ----------------------------------------------------------------------------------


def test_model_card_is_deterministic_and_carries_source_metadata(tmp_path):
    folder = make_checkpoint(tmp_path / "a")
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: mit\nlanguage: en\npipeline_tag: sentence-similarity\n"
                                      "tags:\n- sentence-transformers\n---\n# source\n")
    first = write_model_card(folder, source_dir=source, fidelity={"output_relative_error": 0.05}).read_bytes()
    second = write_model_card(folder, source_dir=source, fidelity={"output_relative_error": 0.05}).read_bytes()
    assert first == second
    assert str(tmp_path).encode() not in first
    data = ModelCard.load(folder / "README.md").data
    assert data.license == "mit" and data.language == "en" and data.pipeline_tag == "sentence-similarity"
    assert {"mlp-fusion", "sentence-transformers"} <= set(data.tags)
    text = first.decode()
    assert "trust_remote_code=True" in text and "import hf_mlpfusion" in text
    assert "Wei, Tianxin" in text and "ICML" in text
    assert "| Parameters before | 30,000 |" in text and "| 1 | 64 | 32 | 2.5 |" in text
    assert "output_relative_error" in text

    # a fresh folder: no source card, no fidelity (the first folder keeps both: they are in its config and card)
    plain = write_model_card(make_checkpoint(tmp_path / "b")).read_text()
    assert "## Fidelity" not in plain and "license:" not in plain
    assert ModelCard.load(tmp_path / "b" / "README.md").data.pipeline_tag == "feature-extraction"


def test_model_card_for_a_local_source_has_no_base_model(tmp_path):
    folder = make_checkpoint(tmp_path / "a")
    config = json.loads((folder / "config.json").read_text())
    config["mlpfusion"]["source_model"] = str(tmp_path / "some" / "local")  # as configs before 0.2 recorded it
    del config["mlpfusion"]["base_model"]  # which had no base_model entry
    config["architectures"] = ["MLPFusionRobertaForMaskedLM"]
    config["model_type"] = "mlpfusion_roberta"
    (folder / "config.json").write_text(json.dumps(config))
    text = write_model_card(folder, repo_id="my-org/x").read_text()
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model is None and data.pipeline_tag == "fill-mask"
    assert 'AutoModel.from_pretrained("my-org/x", trust_remote_code=True)' in text
    assert "stock" not in text
    assert str(tmp_path) not in text and "`local` (as hf-mlpfusion 0.1.0 recorded it" in text  # by its last part only


@pytest.mark.parametrize("arch,tag", [
    ("MLPFusionBertForMaskedLM", "fill-mask"), ("GPT2LMHeadModel", "text-generation"),
    ("MLPFusionGPT2ForCausalLM", "text-generation"), ("RobertaForSequenceClassification", "text-classification"),
    ("BertForTokenClassification", "token-classification"), ("BertForQuestionAnswering", "question-answering"),
    ("BertModel", "feature-extraction"),
])
def test_pipeline_tag_fallback(arch, tag):
    assert pipeline_tag_for([arch]) == tag


# -- round trip through HF_ENDPOINT --------------------------------------------------------------

LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1]).eval()
    ids = torch.tensor([[1, 5, 7, 42, 99, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.save(out, sys.argv[2])
""")


def test_from_pretrained_through_hf_endpoint_matches_local(hub, hub_env, tiny_checkpoint, tmp_path):
    import torch
    from transformers import AutoModel

    push_folder(tiny_checkpoint, REPO, token=WRITE_TOKEN, endpoint=hub.url, private=True)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE_TOKEN, "HF_HOME": str(tmp_path / "fresh_home"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    out_path = tmp_path / "remote.pt"
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, REPO, str(out_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(path.startswith(f"/{REPO}/resolve/") and path.endswith("model.safetensors")
               for _, path in hub.state.requests)  # it really came from the fake Hub

    local = AutoModel.from_pretrained(tiny_checkpoint).eval()
    ids = torch.tensor([[1, 5, 7, 42, 99, 3]])
    with torch.no_grad():
        expected = local(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(torch.load(out_path), expected, atol=1e-6)

    card = hf_hub_download(REPO, "README.md", endpoint=hub.url, token=WRITE_TOKEN, cache_dir=str(tmp_path / "c"))
    data = ModelCard.load(card).data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "transformers" and "mlp-fusion" in data.tags
    assert Path(card).read_bytes() == (tiny_checkpoint / "README.md").read_bytes()  # what is pushed is what was saved


# -- CI recipe and Dockerfile (no Docker engine or GitHub runner here: check what can be checked) ---

ROOT = Path(__file__).resolve().parents[1]


def test_ci_recipe_is_a_models_x_ratios_matrix_that_publishes_with_the_secret():
    import yaml

    workflow = yaml.safe_load((ROOT / "examples/github-actions/publish.yml").read_text())
    job = workflow["jobs"]["publish"]
    matrix = job["strategy"]["matrix"]
    assert "include" not in matrix  # include entries would overwrite each other's added keys
    assert len(matrix["model"]) >= 2 and len(matrix["ratio"]) >= 2
    assert all({"id", "name", "layers"} <= set(m) for m in matrix["model"])
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    run = "\n".join(step.get("run", "") for step in job["steps"])
    assert "mlpfusion compress" in run and "--push-to-hub" in run and '"$REPO_ID"' in run


def test_dockerfile_copies_what_the_package_needs_and_runs_mlpfusion():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[next(i for i, l in enumerate(lines) if l.startswith("FROM"))].split()[1].startswith("pytorch/pytorch:")
    assert "cuda" in next(l for l in lines if l.startswith("FROM"))
    assert 'ENTRYPOINT ["mlpfusion"]' in lines
    assert not any("HF_TOKEN=" in l for l in lines if l.startswith(("ENV", "ARG")))  # never baked in
    copied = [src for l in lines if l.startswith("COPY") for src in l.split()[1:-1]]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is COPY'd but excluded by .dockerignore"
        if src != "README.md":  # the README is the lead's; pyproject needs it at build time
            assert (ROOT / src).exists(), src
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(packages.values()) <= set(copied)  # model_cards/ is mapped into the package
