"""Publishing: check the token, create the repo, upload a fused checkpoint, write its model card.

Everything that talks to the Hub goes through `huggingface_hub`; torch only to describe the method
in a card. Errors are typed (`HubAuthError`, `HubNetworkError`, `HubError`) with one-line messages
that say what to do.

    user = check_write_access("my-org/roberta-base-mlpfusion-0.25")      # before compressing
    write_model_card("out", source_dir="roberta-base-local")           # compress does this
    result = push_folder("out", "my-org/roberta-base-mlpfusion-0.25")  # create repo + commit
    print(describe(result))

The model card is a view of config.json (`mlpfusion`: method, source, base model, calibration,
fidelity) plus the licence and tags carried from the source's card. It is written by compress, by
every `save_pretrained` of a fused model (`card_save_hook`, in the bundle's `SAVE_HOOKS`) and again
by `push_folder` with the repo id filled in; `push_to_hub` runs `push_folder` (`upload_saved`, in
the bundle's `PUSH_HOOKS`), so both publish the same files and card.

Re-publishing the same files makes no commit: the local files are compared with the target
revision's tree (git blob oid for regular files, sha256 for LFS files) before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePath
from typing import Any, Callable, TypeVar

from hf_mlpfusion.errors import MLPFusionError, ModelNotFoundError, NetworkError
from hf_mlpfusion.sources import DEFAULT_MODEL_ID, default_model_path

T = TypeVar("T")

DEFAULT_COMMIT_MESSAGE = "Upload MLP-fused model with hf-mlpfusion"
_IGNORED_PARTS = (".git", ".cache")  # never uploaded (same as huggingface_hub's default ignore patterns)


class HubError(MLPFusionError):
    """Publishing failed for a reason the user can fix (bad folder, bad repo id, Hub refused)."""

    exit_code = 1


class HubAuthError(HubError):
    """No token, a token the Hub rejects, or no write access to the namespace."""

    exit_code = 3


class HubNetworkError(HubError, NetworkError):
    """The Hub could not be reached (after retries)."""

    exit_code = 4


@dataclass(frozen=True)
class PushResult:
    url: str  # what to print: the PR URL, else the commit URL, else the repo URL
    commit_url: str | None
    pr_url: str | None
    changed: bool  # False: the target revision already had these files, no commit was made
    repo_id: str = ""


def describe(result: PushResult) -> str:
    """The line a CLI prints for a push."""
    if not result.changed:
        return f"no changes; already up to date: {result.url}"
    return result.url


# -- token, endpoint, errors ---------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str | None:
    """`--token`, then `HF_TOKEN`, then the login stored by `hf auth login`."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def resolve_endpoint(endpoint: str | None = None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, DNS failures, and 5xx/429 answers: worth retrying."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is not None and (status >= 500 or status == 429)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        module = type(exc).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and any(
            word in type(exc).__name__ for word in ("Connect", "Timeout", "Network", "Protocol", "Transport", "Read", "Write")
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _translate(exc: Exception, *, repo_id: str, endpoint: str, token_hint: bool = True) -> HubError:
    """Map a huggingface_hub / HTTP error to one of ours (network errors are handled by the caller)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    how = "pass --token, set HF_TOKEN, or run `hf auth login`"
    if isinstance(exc, LocalTokenNotFoundError):
        return HubAuthError(f"no Hugging Face token found: {how}")
    status = _status(exc)
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision not found in {repo_id}: {_first_line(exc)}")
    if status == 401 and not isinstance(exc, RepositoryNotFoundError):
        return HubAuthError(f"the Hub at {endpoint} rejected the token (401 Unauthorized): {how} with a valid write token")
    if status == 403 or (status == 401 and isinstance(exc, RepositoryNotFoundError)):
        return HubAuthError(f"the token has no write access to {repo_id} ({status}): use a write token for that namespace")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"repository {repo_id} not found on {endpoint}, or the token cannot see it")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"the Hub refused the request for {repo_id}: {_first_line(exc)}")
    if isinstance(exc, ValueError):
        return HubError(f"cannot publish to {repo_id}: {_first_line(exc)}")
    raise exc


def _with_retries(fn: Callable[[], T], *, retries: int, backoff: float, on_fail: Callable[[Exception], HubError],
                  repo_id: str, endpoint: str) -> T:
    """Run fn; retry network errors `retries` times with exponential back-off; translate other errors."""
    attempt = 0
    while True:
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_network_error(exc):
                if attempt < retries:
                    time.sleep(backoff * (2**attempt))
                    attempt += 1
                    continue
                raise on_fail(exc) from exc
            raise _translate(exc, repo_id=repo_id, endpoint=endpoint) from exc


def _api(endpoint: str, token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="hf-mlpfusion")


# -- access check --------------------------------------------------------------------------------


def _namespace_of(repo_id: str, user: str) -> str:
    return repo_id.split("/", 1)[0] if "/" in repo_id else user


def check_write_access(repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                       retries: int = 2, backoff: float = 0.5) -> str:
    """Fail fast: is there a token, does the Hub accept it, may it write to `repo_id`'s namespace?

    Returns the user name. Raises HubAuthError (missing/bad token, read-only token, foreign
    namespace) or HubNetworkError (Hub unreachable). Makes no change on the Hub.
    """
    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(token)
    if not token:
        raise HubAuthError("no Hugging Face token found: pass --token, set HF_TOKEN, or run `hf auth login`")
    _validate_repo_id(repo_id)
    api = _api(endpoint, token)

    def fail(exc: Exception) -> HubError:
        return HubNetworkError(f"cannot reach the Hub at {endpoint} ({_first_line(exc)}); check the network or --endpoint")

    who = _with_retries(lambda: api.whoami(token=token), retries=retries, backoff=backoff, on_fail=fail,
                        repo_id=repo_id, endpoint=endpoint)
    user = who.get("name") or ""
    namespace = _namespace_of(repo_id, user)
    access = (who.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise HubAuthError(f"the token for {user} is read-only: create a token with write access to publish {repo_id}")
    if role == "fineGrained" and not _fine_grained_allows(access.get("fineGrained") or {}, namespace, user):
        raise HubAuthError(f"the fine-grained token for {user} cannot write to {namespace}: grant it repo write access")
    orgs = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or []}
    if namespace != user and (namespace not in orgs or orgs[namespace] == "read"):
        raise HubAuthError(f"{user} has no write access to the namespace {namespace!r}: publish under {user}/... "
                           f"or ask an admin of {namespace} for write access")
    return user


def _fine_grained_allows(fine: dict, namespace: str, user: str) -> bool:
    scoped = fine.get("scoped")
    if not isinstance(scoped, list):
        return True  # unknown layout: let the Hub decide when we commit
    for scope in scoped:
        entity = scope.get("entity") or {}
        if entity.get("name") in (namespace, None) or (entity.get("type") == "user" and namespace == user):
            if any(p in ("repo.write", "repo.content.write") for p in scope.get("permissions") or []):
                return True
    return False


_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _validate_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError(f"invalid repo id {repo_id!r}: expected NAMESPACE/NAME, e.g. my-org/roberta-base-mlpfusion-0.25")


# -- push ----------------------------------------------------------------------------------------


def _local_files(folder: Path) -> list[str]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part in _IGNORED_PARTS for part in rel.parts):
            files.append(rel.as_posix())
    return files


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unchanged(path: Path, remote: Any) -> bool:
    """Does the remote tree entry hold exactly this file?"""
    if remote is None or getattr(remote, "size", None) != path.stat().st_size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == _sha256(path)
    if path.stat().st_size > 50 * 1024 * 1024:
        return False
    return remote.blob_id == _git_blob_oid(path.read_bytes())


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                endpoint: str | None = None, retries: int = 3, backoff: float = 1.0) -> PushResult:
    """Create `repo_id` if needed and commit the files of `folder` that differ from the target revision.

    No difference -> no commit (`changed=False`). Network errors are retried `retries` times with
    exponential back-off starting at `backoff` seconds. With `create_pr`, the commit goes to a new
    pull request against `revision` (default: main). The folder's own hf-mlpfusion model card is
    written again with `repo_id` in its loading snippets (`refresh_card`) before anything is
    compared, so the folder holds what the Hub gets; nothing else in it is touched, and a failed
    upload deletes nothing.
    """
    folder = Path(folder)
    endpoint = resolve_endpoint(endpoint)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder: give the output folder of `mlpfusion compress`")
    if not _local_files(folder):
        raise HubError(f"{folder} is empty: nothing to publish")
    if not (folder / "config.json").is_file():  # checked here, before any request: a folder of other files
        raise HubError(f"{folder} has no config.json, so it is not a checkpoint folder: give the output folder of "
                       "`mlpfusion compress` (`hf upload` publishes other files)")
    if create_pr and revision and revision.startswith("refs/pr/"):
        raise HubError("--create-pr opens a new pull request: give a branch as --revision, not a PR ref")

    retry_hint = f"the checkpoint is kept in {folder}; retry with `mlpfusion push {repo_id} {folder}`"

    def fail(exc: Exception) -> HubError:
        return HubNetworkError(f"cannot reach the Hub at {endpoint} after {retries + 1} attempts "
                               f"({_first_line(exc)}); {retry_hint}")

    try:
        user = check_write_access(repo_id, token=token, endpoint=endpoint, retries=retries, backoff=backoff)
    except HubNetworkError as err:
        raise fail(err.__cause__ or err) from err.__cause__
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    refresh_card(folder, full_id)  # the card's loading snippets name the repo it is published to
    files = _local_files(folder)
    api = _api(endpoint, resolve_token(token))

    def attempt() -> PushResult:
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import RevisionNotFoundError

        api.create_repo(full_id, private=private, exist_ok=True)
        target = revision or "main"
        try:
            head = api.repo_info(full_id, revision=target).sha
        except RevisionNotFoundError:
            if create_pr or target.startswith("refs/pr/"):
                raise
            api.create_branch(full_id, branch=target, exist_ok=True)
            head = api.repo_info(full_id, revision=target).sha
        remote = {entry.path: entry for entry in api.list_repo_tree(full_id, revision=target, recursive=True)
                  if hasattr(entry, "blob_id")}
        changed = [f for f in files if not _unchanged(folder / f, remote.get(f))]
        if not changed:
            url = f"{endpoint}/{full_id}/commit/{head}" if head else f"{endpoint}/{full_id}"
            return PushResult(url=url, commit_url=url if head else None, pr_url=None, changed=False, repo_id=full_id)
        info = api.create_commit(
            full_id,
            operations=[CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in changed],
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=revision,
            create_pr=create_pr,
        )
        pr_url = info.pr_url if create_pr else None
        return PushResult(url=pr_url or info.commit_url, commit_url=info.commit_url, pr_url=pr_url, changed=True,
                          repo_id=full_id)

    try:
        return _with_retries(attempt, retries=retries, backoff=backoff, on_fail=fail, repo_id=full_id,
                             endpoint=endpoint)
    except HubNetworkError:
        raise
    except HubError as err:
        if isinstance(err, HubAuthError):
            raise
        raise type(err)(f"{err}; {retry_hint}") from err.__cause__


# -- where a model came from ---------------------------------------------------------------------

_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[0-9a-f]{40}/?$")


def source_identity(name_or_path: str | os.PathLike | None) -> tuple[str, str | None]:
    """(source_model, base_model) to record for a model loaded from `name_or_path`.

    What transformers would load is what counts: an existing local folder is recorded by its folder
    name only (never an absolute path, so the same model fused from two folders gives the same
    bytes) and is no Hub model, unless it is a snapshot in the Hugging Face cache
    (`.../models--org--name/snapshots/<sha>`), which is that Hub id, or the installed built-in
    default, which is the Hub's all-MiniLM-L6-v2 (as when no model is named). Anything else that is
    a valid Hub id is both the source and the `base_model`.
    """
    if not name_or_path:
        return "", None
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        resolved = path.resolve()
        snapshot = _SNAPSHOT.search(resolved.as_posix())
        if snapshot:
            repo_id = f"{snapshot.group(1)}/{snapshot.group(2)}"
            return repo_id, repo_id
        if _is_builtin_default(resolved):
            return DEFAULT_MODEL_ID, DEFAULT_MODEL_ID
        return resolved.name or text, None
    if _is_path_like(text) or not _REPO_ID.match(text):
        return PurePath(text.replace("\\", "/")).name or text, None
    return text, text


def _is_builtin_default(resolved: Path) -> bool:
    """Is this folder the installed built-in default (the Hub's all-MiniLM-L6-v2, from PyPI)?"""
    try:
        return resolved == default_model_path().resolve()
    except ModelNotFoundError:
        return False


def _is_path_like(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or os.path.isabs(text) or text.count("/") > 1


def check_base_model(base_model: str | None) -> str | None:
    """A `--base-model` must be a Hub model id (org/name): the card links it."""
    if base_model is None:
        return None
    if _is_path_like(base_model) or not _REPO_ID.match(base_model) or ".." in base_model:
        raise HubError(f"--base-model {base_model!r} is not a Hub model id: give the org/name it has on the Hub")
    return base_model


def _shown_source(source: str | None) -> str | None:
    """The source as a card may show it: a path (from a config written before 0.2) by its last part."""
    if not source:
        return None
    return PurePath(source.replace("\\", "/")).name if _is_path_like(source) else source


def download(repo_id: str, patterns: list[str], *, revision: str | None = None, token: str | None = None,
             endpoint: str | None = None) -> Path:
    """The files of a Hub model that match `patterns`, in the local cache: its snapshot folder. One
    request tells whether the Hub answers (no retry loop when it is unreachable), and every failure
    is one of our errors that says what to do. `endpoint`: the Hub to read from (default: HF_ENDPOINT
    or huggingface.co), as `--endpoint` names it for pushing too."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns,
                                     endpoint=endpoint and resolve_endpoint(endpoint)))
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub id (org/name)") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated: accept its terms on the Hub and pass --token") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id} not found (no such folder, and no such Hub repo or no access): "
                                 "check the name or pass --token") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision {revision!r} of {repo_id} not found: check --revision") from None
    except LocalEntryNotFoundError:
        raise NetworkError(f"could not download {repo_id}: the Hub is unreachable (or HF_HUB_OFFLINE is set) and it "
                           "is not cached; check the network or pass a local folder") from None
    except OSError as err:  # connection errors from httpx/requests are OSErrors
        raise NetworkError(f"could not download {repo_id}: {err.__class__.__name__}; check the network and retry") from None


def download_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | None = None,
                  endpoint: str | None = None) -> Path:
    """One file of a Hub model (`info` needs config.json only), with the same errors as a full download."""
    path = download(repo_id, [filename], revision=revision, token=token, endpoint=endpoint) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{repo_id} has no {filename}: it is not a transformers checkpoint")
    return path


# -- model card ----------------------------------------------------------------------------------

CARD_MARKER = ("<!-- Written by hf-mlpfusion from config.json; saving or pushing the model rewrites it. "
               "Delete this line to keep edits of your own. -->")

_PIPELINE_BY_SUFFIX = (
    ("ForMaskedLM", "fill-mask"),
    ("LMHeadModel", "text-generation"),
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)
_CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")
_OWN_TAGS = ("mlp-fusion", "model-compression", "hf-mlpfusion")

_FUSION_TEXT = (
    "MLP fusion treats each intermediate neuron of a transformer MLP as a one-neuron sub-MLP, clusters the "
    "sub-MLPs of a layer with k-means and replaces the layer by the cluster centroids, weighted by a frozen count "
    "vector (the cluster sizes). The fused MLP approximates the original one's neural tangent kernel, so the "
    "smaller model fine-tunes much like the original."
)


def pipeline_tag_for(architectures: list[str] | None) -> str:
    """Pipeline tag implied by the architecture class name (…ForMaskedLM -> fill-mask, base model -> feature-extraction)."""
    for arch in architectures or []:
        for suffix, tag in _PIPELINE_BY_SUFFIX:
            if arch.endswith(suffix):
                return tag
    return "feature-extraction"


def is_own_card(readme: str | os.PathLike) -> bool:
    """Was this README written by hf-mlpfusion (and not edited into the user's own card since)?"""
    path = Path(readme)
    try:
        return path.is_file() and CARD_MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _card_metadata(readme: Path | None) -> dict:
    """Licence, language, datasets, pipeline tag and tags of a model card, to carry over."""
    if readme is None or not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken card must not stop us; we just know less
        return {}
    out = {k: data[k] for k in _CARRIED_METADATA if data.get(k)}
    out["tags"] = [t for t in data.get("tags") or [] if isinstance(t, str)]
    return out


def _source_metadata(source_dir: str | os.PathLike | None) -> dict:
    return {} if source_dir is None else _card_metadata(Path(source_dir) / "README.md")


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(value.items())) or "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value: Any, spec: str = ".4g") -> str:
    return "—" if not isinstance(value, (int, float)) or isinstance(value, bool) else format(value, spec)


def _method_description(name: str) -> str:
    from .methods import METHODS  # the methods own their one-line descriptions (imports torch: only when rendering)

    method = METHODS.get(name)
    return method.description if method is not None and method.description else f"the `{name}` method"


def _intro(meta: dict, source_ref: str) -> str:
    method = meta.get("method") or "fusion"
    version = meta.get("library_version", "")
    made = f"written by `hf-mlpfusion` {version}".rstrip()
    if method == "fusion":
        return (f"This model is {source_ref} made smaller with **MLP fusion** (Wei et al., ICML 2023; see the "
                f"citation below), {made}.\n\n{_FUSION_TEXT}")
    return (f"This model is {source_ref} made smaller with the **`{method}`** baseline of `hf-mlpfusion` "
            f"({made}): {_method_description(method)}. It is one of the baselines the MLP fusion paper "
            "(Wei et al., ICML 2023) compares with, not MLP fusion itself.")


def _evaluation_section(fidelity: dict) -> str:
    """The `evaluate --card` record (structured), or a plain measure -> value mapping."""
    if isinstance(fidelity.get("domains"), list):
        return _domains_section(fidelity)
    results = fidelity.get("results")
    if not isinstance(results, dict):
        rows = "\n".join(f"| {_fmt(k)} | {_fmt(v)} |" for k, v in sorted(fidelity.items()))
        return f"Measured against the source model:\n\n| measure | value |\n|---|---:|\n{rows}\n"
    where = fidelity.get("text") or "text"
    if fidelity.get("dataset_id"):
        where = f"{where} (from the Hub dataset [{fidelity['dataset_id']}](https://huggingface.co/datasets/{fidelity['dataset_id']}))"
    head = (f"Measured with `mlpfusion evaluate --card` against `{_fmt(fidelity.get('compared_with'))}` on "
            f"{_fmt(fidelity.get('samples'))} samples ({_fmt(fidelity.get('tokens'))} tokens) of {where}:\n\n"
            "| measure | source model | this model |\n|---|---:|---:|\n")
    rows = []
    if results.get("hidden_relative_error") is not None:
        rows.append(("last hidden state, relative error", "0", _num(results["hidden_relative_error"])))
    if results.get("cosine_mean") is not None:
        rows.append(("embedding cosine to the source (mean / min)", "1",
                     f"{_num(results['cosine_mean'])} / {_num(results.get('cosine_min'))}"))
    if results.get("perplexity_after") is not None:
        rows.append(("perplexity", _num(results.get("perplexity_before")), _num(results["perplexity_after"])))
    if results.get("mlm_loss_after") is not None:
        rows.append(("masked-LM loss", _num(results.get("mlm_loss_before")), _num(results["mlm_loss_after"])))
    rows += _text_free_rows(results)
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n"


def _text_free_rows(results: dict, where: str = "") -> list[tuple[str, str, str]]:
    """The rows that do not depend on the text: the Adam-NTK error per layer and the parameters."""
    rows = [(f"Adam-NTK relative error, layer {layer}{where}", "0", _num(err))
            for layer, err in sorted((results.get("ntk_error") or {}).items(), key=lambda kv: int(kv[0]))]
    if results.get("parameters_after") is not None:
        rows.append(("parameters", _fmt(results.get("parameters_before")), _fmt(results["parameters_after"])))
    return rows


def _domains_section(fidelity: dict) -> str:
    """The `evaluate --card` record of several texts: one row per text, then the text-free figures."""
    domains = [d for d in fidelity["domains"] if isinstance(d, dict) and isinstance(d.get("results"), dict)]
    columns = [(key, title, cell) for key, title, cell in (
        ("hidden_relative_error", "last hidden state, relative error", lambda r: _num(r["hidden_relative_error"])),
        ("cosine_mean", "embedding cosine (mean / min)", lambda r: f"{_num(r['cosine_mean'])} / {_num(r.get('cosine_min'))}"),
        ("perplexity_after", "perplexity (source -> this model)",
         lambda r: f"{_num(r.get('perplexity_before'))} -> {_num(r['perplexity_after'])}"),
        ("mlm_loss_after", "masked-LM loss (source -> this model)",
         lambda r: f"{_num(r.get('mlm_loss_before'))} -> {_num(r['mlm_loss_after'])}"),
    ) if any(d["results"].get(key) is not None for d in domains)]
    head = (f"Measured with `mlpfusion evaluate --card` against `{_fmt(fidelity.get('compared_with'))}` on "
            f"{len(domains)} texts, each on its own:\n\n"
            "| text | samples (tokens) | " + " | ".join(title for _, title, _ in columns) + " |\n"
            "|---|---:|" + "---:|" * len(columns) + "\n")
    rows = ["| " + " | ".join([_fmt(d.get("text")), f"{_fmt(d.get('samples'))} ({_fmt(d.get('tokens'))})"]
                              + [cell(d["results"]) if d["results"].get(key) is not None else "—"
                                 for key, _, cell in columns]) + " |" for d in domains]
    table = head + "\n".join(rows) + "\n"
    fixed = _text_free_rows(fidelity.get("results") or {}, " (on the first text)")
    if fixed:
        table += ("\n| measure | source model | this model |\n|---|---:|---:|\n"
                  + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in fixed) + "\n")
    return table


def _calibration_section(cal: dict) -> str:
    layers = [e for e in cal.get("layers") or [] if isinstance(e, dict) and "layer" in e]
    if not layers:
        return ""
    steps = " + ".join(s for s, on in (("least-squares refit", cal.get("refit")),
                                         (f"{cal.get('distill_steps')} distillation steps", cal.get("distill_steps")))
                       if on) or "calibration"
    text = cal.get("text")
    text = "the built-in text" if text in (None, "builtin") else f"`{_fmt(text)}`"
    rows = "\n".join(f"| {e['layer']} | {_num(e.get('error_before'))} | {_num(e.get('error_after'))} |" for e in layers)
    return (f"Calibration ({steps}) on {_fmt(cal.get('samples'))} samples ({_fmt(cal.get('tokens'))} tokens) of "
            f"{text}. Relative squared error of each fused layer's MLP block output on that text, which is the "
            "fit's own data, not held-out text:\n\n"
            f"| layer | after fusion | after calibration |\n|---:|---:|---:|\n{rows}\n")


def _eval_results(fidelity: dict | None, pipeline_tag: str):
    """Hub `model-index` results: only for an evaluation on a Hub dataset (the Hub links `dataset.type`)."""
    if not fidelity or not fidelity.get("dataset_id") or not isinstance(fidelity.get("results"), dict):
        return None
    from huggingface_hub import EvalResult

    results = fidelity["results"]
    measures = (
        ("perplexity_after", "perplexity", "Perplexity"),
        ("mlm_loss_after", "loss", "Masked-LM loss"),
        ("cosine_mean", "cosine_similarity", "Embedding cosine to the source model (mean)"),
        ("hidden_relative_error", "relative_error", "Last hidden state, relative error to the source model"),
    )
    out = [EvalResult(task_type=pipeline_tag, dataset_type=fidelity["dataset_id"], dataset_name=fidelity["dataset_id"],
                      metric_type=metric, metric_value=round(float(results[key]), 6), metric_name=name)
           for key, metric, name in measures if isinstance(results.get(key), (int, float))]
    return out or None


def render_model_card(config: dict, *, source_meta: dict | None = None, fidelity: dict | None = None,
                      repo_id: str | None = None, sentence_transformers: bool = False):
    """Build the ModelCard (not saved) from a fused checkpoint's config.json dict.

    Everything comes from config.json (`mlpfusion`: method, source, base model, calibration, fidelity)
    plus the carried-over metadata of a card (`source_meta`); nothing depends on where the files lie.
    `sentence_transformers`: the checkpoint is also a sentence-transformers model (it has modules.json):
    the card names that library, the sentence-similarity pipeline and shows a SentenceTransformer snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = config.get("mlpfusion") or {}
    source_meta = dict(source_meta or {})
    source = _shown_source(meta.get("source_model"))
    base_model = meta.get("base_model") or None
    fidelity = fidelity if fidelity is not None else meta.get("fidelity")

    tags = list(_OWN_TAGS)
    tags += [t for t in source_meta.pop("tags", []) if t not in tags and t not in ("base_model", "license")]
    pipeline_tag = source_meta.pop("pipeline_tag", None) or pipeline_tag_for(config.get("architectures"))
    library_name = "transformers"
    if sentence_transformers:
        library_name, pipeline_tag = "sentence-transformers", "sentence-similarity"
        tags += [t for t in ("sentence-transformers", "sentence-similarity") if t not in tags]

    name = repo_id.split("/")[-1] if repo_id else None
    if name is None:
        base = (source or "model").rstrip("/").split("/")[-1]
        ratio = meta.get("ratio")
        name = f"{base}-mlpfusion" + (f"-{ratio:g}" if isinstance(ratio, (int, float)) else "")
    eval_results = _eval_results(fidelity, pipeline_tag)
    # base_model_relation is left out: the Hub's values (adapter, merge, quantized, finetune) name other
    # derivations; MLP fusion is a structural compression of the base model's own weights.
    card_data = ModelCardData(base_model=base_model, library_name=library_name, pipeline_tag=pipeline_tag, tags=tags,
                              model_name=name if eval_results else None, eval_results=eval_results, **source_meta)

    method = meta.get("method") or "fusion"
    if base_model:
        source_row = f"[{base_model}](https://huggingface.co/{base_model})"
        source_ref = source_row
    elif source and "base_model" not in meta:  # written before the source's kind was recorded
        source_row = (f"`{_fmt(source)}` (as hf-mlpfusion {_fmt(meta.get('library_version'))} recorded it; "
                      "whether that is a Hub id was not recorded)")
        source_ref = f"`{_fmt(source)}`"
    elif source:
        source_row = f"`{_fmt(source)}` (a local folder; not on the Hub as far as hf-mlpfusion knows)"
        source_ref = f"`{_fmt(source)}`"
    else:
        source_row, source_ref = "—", "a model"
    before, after = meta.get("num_parameters_before"), meta.get("num_parameters_after")
    licence = source_meta.get("license")
    rows = [
        ("Method", f"`{method}`: {_method_description(method)}"),
        ("Source model", source_row),
        ("Licence", f"`{_fmt(licence)}` (the source model's)" if licence else
         "not recorded here: the source model's licence applies; check it"),
        ("Ratio", _fmt(meta.get("ratio")) if meta.get("ratio") is not None else "—"),
        ("Intermediate size", _fmt(meta.get("intermediate_size"))),
        ("Fused layers", _fmt(meta.get("layers"))),
        ("Count vector folded into the weights", _fmt(meta.get("fold_scale"))),
        ("Parameters before", _fmt(before)),
        ("Parameters after", _fmt(after)),
    ]
    if isinstance(before, int) and isinstance(after, int) and before > 0:
        rows.append(("Parameters removed", f"{before - after:,} ({100 * (before - after) / before:.1f} %)"))
    rows.append(("Seed", _fmt(meta.get("seed"))))
    if meta.get("kmeans"):
        rows.append(("k-means", _fmt(meta.get("kmeans"))))
    if meta.get("clustering"):
        rows.append(("Clustering", "data-aware (statistics of the original MLP inputs on calibration text)"
                     if meta["clustering"] == "data-aware" else "data-free (the paper's)"))
    cal = meta.get("calibration")
    if cal:
        rows.append(("Calibration", f"refit: {_fmt(cal.get('refit'))}, distillation steps: {_fmt(cal.get('distill_steps'))}, "
                                    f"{_fmt(cal.get('samples'))} samples, token weighting: {_fmt(cal.get('weighting', 'uniform'))}"))
    alloc = meta.get("allocation")
    if alloc:
        rows.append(("Width allocation", f"per layer, from each layer's measured refit error at candidate widths: "
                                         f"{_fmt(alloc.get('total'))} of a budget of {_fmt(alloc.get('budget'))} neurons"))
    summary_rows = "\n".join(f"| {k} | {v} |" for k, v in rows)

    layers = list(meta.get("layers") or [])
    widths_before, widths_after = list(meta.get("widths_before") or []), list(meta.get("widths_after") or [])
    inertia = list(meta.get("inertia") or [])
    layer_rows = []

    def width(widths: list, i: int, layer: int):  # one entry per fused layer, or one per model layer
        if len(widths) == len(layers):
            return widths[i]
        return widths[layer] if 0 <= layer < len(widths) else None

    clustered = any(v is not None for v in inertia)  # prune and sketch have no k-means, so no inertia column
    for i, layer in enumerate(layers):
        wb, wa = width(widths_before, i, layer), width(widths_after, i, layer)
        cells = [str(layer), _fmt(wb), _fmt(wa)] + ([_fmt(inertia[i] if i < len(inertia) else None)] if clustered else [])
        layer_rows.append("| " + " | ".join(cells) + " |")
    header = ["layer", "width before", "width after"] + (["k-means inertia"] if clustered else [])
    if not layer_rows:
        layer_rows = ["| " + " | ".join("—" for _ in header) + " |"]
    layer_table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)] + layer_rows)

    parts = [p for p in ((_evaluation_section(fidelity) if fidelity else ""),
                         (_calibration_section(cal) if isinstance(cal, dict) else "")) if p]
    fidelity_section = ""
    if parts:
        fidelity_section = ("## Fidelity\n\nFigures measured by hf-mlpfusion when the checkpoint was made or "
                            "evaluated; training the model further makes them stale.\n\n" + "\n".join(parts) + "\n")
    model_type = str(config.get("model_type", ""))
    stock_note = ""
    if not model_type.startswith("mlpfusion"):
        stock_note = ("Here the cluster counts are folded into the weights and every fused layer has the same width, "
                      f"so this is a stock `{model_type}` checkpoint: plain `AutoModel.from_pretrained` works as well.\n\n")

    values = {
        "card_data": card_data.to_yaml(),
        "marker": CARD_MARKER,
        "title": name,
        "intro": _intro(meta, source_ref),
        "summary_rows": summary_rows,
        "layer_table": layer_table,
        "fidelity_section": fidelity_section,
        "repo_id": repo_id or f"your-namespace/{name}",
        "stock_note": stock_note,
    }
    template = resources.files("hf_mlpfusion.model_cards").joinpath("mlpfusion.md").read_text(encoding="utf-8") \
        if _has_package_template() else (Path(__file__).resolve().parent.parent / "model_cards" / "mlpfusion.md").read_text(encoding="utf-8")
    # The template's sentence-transformers block: kept (without its markers) only for such a model.
    template = re.sub(r"<!-- sentence-transformers -->(.*?)<!-- /sentence-transformers -->",
                      lambda m: m.group(1) if sentence_transformers else "", template, flags=re.S)
    content = re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], template)
    return ModelCard(content)


def _has_package_template() -> bool:
    try:
        return resources.files("hf_mlpfusion.model_cards").joinpath("mlpfusion.md").is_file()
    except ModuleNotFoundError:
        return False


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model_card(folder: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                     fidelity: dict | None = None, repo_id: str | None = None) -> Path:
    """Write folder/README.md from model_cards/mlpfusion.md and folder/config.json.

    Licence, language, datasets, tags and pipeline tag are carried over from source_dir/README.md,
    or, without a source_dir, from the README.md already in the folder. `fidelity` (a measure ->
    value mapping, or the record `mlpfusion evaluate --card` writes) is stored in config.json's
    `mlpfusion` entry first, so a later save or push renders it again. Deterministic: same inputs,
    byte-identical card (no dates, no absolute paths).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HubError(f"{folder} has no config.json: write the model card into a saved checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(f"{config_path} is not valid JSON ({err}): fix or re-save the checkpoint") from None
    if fidelity is not None:
        if not isinstance(config.get("mlpfusion"), dict):
            raise HubError(f"{folder} is not an MLP-fused checkpoint (config.json has no 'mlpfusion' entry)")
        config["mlpfusion"]["fidelity"] = fidelity
        _write_json(config_path, config)
    from .sentence_transformers_files import is_sentence_transformers

    readme = folder / "README.md"
    carried = _source_metadata(source_dir) if source_dir is not None else _card_metadata(readme)
    if repo_id is None and source_dir is None:
        repo_id = _card_repo_id(readme)  # a card published before keeps naming its repo
    card = render_model_card(config, source_meta=carried, repo_id=repo_id,
                             sentence_transformers=is_sentence_transformers(folder))
    text = str(card) if str(card).endswith("\n") else f"{card}\n"
    readme.write_text(text, encoding="utf-8", newline="\n")
    return readme


_SNIPPET_REPO = re.compile(r'AutoModel\.from_pretrained\("([^"]+)", trust_remote_code=True\)')


def _card_repo_id(readme: Path) -> str | None:
    """The repo id in the loading snippet of an hf-mlpfusion card (None for the placeholder, or another card)."""
    if not is_own_card(readme):
        return None
    match = _SNIPPET_REPO.search(readme.read_text(encoding="utf-8"))
    repo_id = match.group(1) if match else None
    return None if not repo_id or repo_id.startswith("your-namespace/") or not _REPO_ID.match(repo_id) else repo_id


def card_save_hook(folder: Path, model) -> None:
    """`SAVE_HOOKS` entry: the package's card next to every save of a fused model.

    The source folder is unknown here, so the licence and the rest of the metadata are carried from
    the card already in the folder, else from the folder the model was loaded from; with neither,
    the card says the licence was not recorded. A README.md that is not hf-mlpfusion's own (no
    marker line) is left alone."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    readme = folder / "README.md"
    if readme.exists() and not is_own_card(readme):
        return
    origin = None
    loaded_from = getattr(model, "name_or_path", None)
    if not readme.exists() and loaded_from and Path(str(loaded_from)).is_dir():
        origin = Path(str(loaded_from))
        if origin.resolve() == folder.resolve():
            origin = None
    try:
        write_model_card(folder, source_dir=origin)
    except Exception as err:  # noqa: BLE001 - the weights are saved; a card that cannot be written must not undo that
        import warnings

        warnings.warn(f"the model was saved to {folder}, but hf-mlpfusion could not write its model card ({err})",
                      RuntimeWarning, stacklevel=2)


def refresh_card(folder: str | os.PathLike, repo_id: str) -> bool:
    """Fill the repo id into the folder's hf-mlpfusion card (or write one) before publishing; a card that
    is not ours, or a folder that is not a fused checkpoint, is left alone. True if it was (re)written."""
    folder = Path(folder)
    config_path = folder / "config.json"
    readme = folder / "README.md"
    if not config_path.is_file() or (readme.exists() and not is_own_card(readme)):
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    if not isinstance(config.get("mlpfusion"), dict):
        return False
    if readme.exists() and _card_repo_id(readme) == repo_id:
        return False  # already rendered for this repo (every change to config.json renders the card again)
    try:
        write_model_card(folder, repo_id=repo_id)
    except OSError as err:
        raise HubError(f"cannot write the model card into {folder} ({err.strerror or err}): make the folder "
                       "writable, or publish it with `hf upload`") from None
    return True


def upload_saved(folder: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                 private: bool | None = None, token: str | bool | None = None, create_pr: bool = False,
                 revision: str | None = None, endpoint: str | None = None) -> str:
    """`PUSH_HOOKS` entry: what a fused model's `push_to_hub` runs once it has saved itself into `folder`,
    i.e. `mlpfusion push` (the same checks, files, card and no-op re-publishing). Returns the URL
    `mlpfusion push` prints (commit, pull request, or the commit that already has these files)."""
    result = push_folder(folder, repo_id, token=None if token is True else (token or None), private=bool(private),
                         revision=revision, create_pr=create_pr, commit_message=commit_message, endpoint=endpoint)
    return result.url


# -- fidelity measured by `mlpfusion evaluate --card` ------------------------------------------------

_TEXT_RESULTS = ("hidden_relative_error", "cosine_mean", "cosine_min", "perplexity_before", "perplexity_after",
                 "mlm_loss_before", "mlm_loss_after")  # the figures that depend on the text
_TEXT_FREE_RESULTS = ("ntk_error", "ntk_error_mean", "parameters_before", "parameters_after")
_CARD_RESULTS = _TEXT_RESULTS + _TEXT_FREE_RESULTS


def check_dataset_id(dataset_id: str | None) -> str | None:
    """A `--dataset-id` must be a Hub dataset id (org/name): the card's model-index links it."""
    if dataset_id is not None and (_is_path_like(dataset_id) or not _REPO_ID.match(dataset_id) or "/" not in dataset_id):
        raise HubError(f"--dataset-id {dataset_id!r} is not a Hub dataset id: give its org/name")
    return dataset_id


def fidelity_record(report: dict, *, compared_with: str, text: str, dataset_id: str | None = None) -> dict:
    """What `evaluate --card` stores in config.json's `mlpfusion.fidelity`: the report's figures without
    its timings (machine-dependent: a card must not change when nothing but the machine did)."""
    check_dataset_id(dataset_id)
    return {
        "compared_with": compared_with,
        "text": text,
        "dataset_id": dataset_id,
        "samples": report.get("samples"),
        "tokens": report.get("tokens"),
        "results": {k: report.get(k) for k in _CARD_RESULTS if report.get(k) is not None},
    }


def domains_fidelity_record(reports: dict[str, dict], *, compared_with: str, texts: dict[str, str]) -> dict:
    """`evaluate --card` on several texts: each text's figures (`texts` names how the card shows it),
    and the ones that do not depend on the text (the NTK, measured on the first, and the parameters)
    once. No timings, as in `fidelity_record`; no Hub dataset (the model-index takes one)."""
    def figures(report, keys):
        return {k: report.get(k) for k in keys if report.get(k) is not None}

    first = next(iter(reports.values()))
    return {
        "compared_with": compared_with,
        "dataset_id": None,
        "domains": [{"name": name, "text": texts[name], "samples": r.get("samples"), "tokens": r.get("tokens"),
                     "results": figures(r, _TEXT_RESULTS)} for name, r in reports.items()],
        "results": figures(first, _TEXT_FREE_RESULTS),
    }


def record_fidelity(folder: str | os.PathLike, record: dict) -> bool:
    """Store `record` in folder/config.json's `mlpfusion.fidelity` and render the card again, unless the
    folder's README.md is not hf-mlpfusion's (then it is left alone). True if the card was written."""
    folder = Path(folder)
    readme = folder / "README.md"
    if readme.exists() and not is_own_card(readme):
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["mlpfusion"]["fidelity"] = record
        _write_json(config_path, config)
        return False
    write_model_card(folder, fidelity=record)
    return True
