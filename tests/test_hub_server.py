"""The fake Hub behaves like the Hub as far as the real huggingface_hub client can tell."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from hub_fixtures import OTHER_WRITE_TOKEN, READ_TOKEN, WRITE_TOKEN, hub, hub_env, make_checkpoint  # noqa: F401


def test_create_upload_noop_and_download(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    assert api.whoami()["name"] == "alice"
    url = api.create_repo("my-org/tiny")
    assert api.create_repo("my-org/tiny", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError):
        api.create_repo("my-org/tiny")  # 409 without exist_ok

    info = api.upload_folder(folder_path=folder, repo_id="my-org/tiny")
    assert info.oid in info.commit_url
    siblings = {s.rfilename: s for s in api.repo_info("my-org/tiny", files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs is not None  # went through the LFS batch API
    assert siblings["model.safetensors"].lfs.size == (folder / "model.safetensors").stat().st_size
    assert siblings["config.json"].lfs is None  # regular, base64 in the commit payload
    assert hub.state.lfs_store  # LFS object uploaded
    n = len(api.list_repo_commits("my-org/tiny"))
    assert n == 2  # initial commit + upload

    again = api.upload_folder(folder_path=folder, repo_id="my-org/tiny")
    assert again.oid == info.oid and len(api.list_repo_commits("my-org/tiny")) == n

    path = hf_hub_download("my-org/tiny", "model.safetensors", endpoint=hub.url, token=WRITE_TOKEN,
                           cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == (folder / "model.safetensors").read_bytes()
    snap = snapshot_download("my-org/tiny", endpoint=hub.url, token=WRITE_TOKEN, cache_dir=tmp_path / "cache2")
    assert (tmp_path / "cache2").exists() and open(f"{snap}/config.json").read() == (folder / "config.json").read_text()


def test_pr_private_and_auth(hub):
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/secret", private=True)
    info = api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="alice/secret", create_pr=True)
    assert info.pr_url.endswith("/discussions/1") and info.pr_revision == "refs/pr/1"
    refs = api.list_repo_refs("alice/secret", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    assert "a.txt" not in api.list_repo_files("alice/secret")  # main untouched
    assert "a.txt" in api.list_repo_files("alice/secret", revision="refs/pr/1")

    assert api.repo_info("alice/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).repo_info("alice/secret")  # anonymous
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=OTHER_WRITE_TOKEN).repo_info("alice/secret")

    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_not_a_token").whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token=READ_TOKEN).upload_file(path_or_fileobj=b"x", path_in_repo="b.txt",
                                                              repo_id="alice/secret")
    assert err.value.response.status_code == 403
