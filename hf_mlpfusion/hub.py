"""Publishing: check the token, create the repo, upload a fused checkpoint, write its model card.

Everything that talks to the Hub goes through `huggingface_hub`; no torch here. Errors are typed
(`HubAuthError`, `HubNetworkError`, `HubError`) with one-line messages that say what to do.

    user = check_write_access("my-org/roberta-base-mlpfusion-0.25")      # before compressing
    write_model_card("out", source_dir="roberta-base-local")           # compress does this
    result = push_folder("out", "my-org/roberta-base-mlpfusion-0.25")  # create repo + commit
    print(describe(result))

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
from pathlib import Path
from typing import Any, Callable, TypeVar

from hf_mlpfusion.errors import MLPFusionError, NetworkError

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
    exponential back-off starting at `backoff` seconds; the local folder is never touched. With
    `create_pr`, the commit goes to a new pull request against `revision` (default: main).
    """
    folder = Path(folder)
    endpoint = resolve_endpoint(endpoint)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder: give the output folder of `mlpfusion compress`")
    files = _local_files(folder)
    if not files:
        raise HubError(f"{folder} is empty: nothing to publish")
    if create_pr and revision and revision.startswith("refs/pr/"):
        raise HubError("--create-pr opens a new pull request: give a branch as --revision, not a PR ref")

    retry_hint = f"the checkpoint is kept in {folder}; retry with `mlpfusion push {folder} {repo_id}`"

    def fail(exc: Exception) -> HubError:
        return HubNetworkError(f"cannot reach the Hub at {endpoint} after {retries + 1} attempts "
                               f"({_first_line(exc)}); {retry_hint}")

    try:
        user = check_write_access(repo_id, token=token, endpoint=endpoint, retries=retries, backoff=backoff)
    except HubNetworkError as err:
        raise fail(err.__cause__ or err) from err.__cause__
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
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


# -- model card ----------------------------------------------------------------------------------

_PIPELINE_BY_SUFFIX = (
    ("ForMaskedLM", "fill-mask"),
    ("LMHeadModel", "text-generation"),
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)
_CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")


def pipeline_tag_for(architectures: list[str] | None) -> str:
    """Pipeline tag implied by the architecture class name (…ForMaskedLM -> fill-mask, base model -> feature-extraction)."""
    for arch in architectures or []:
        for suffix, tag in _PIPELINE_BY_SUFFIX:
            if arch.endswith(suffix):
                return tag
    return "feature-extraction"


def _looks_like_hub_id(source: str | None) -> bool:
    return bool(source) and not source.startswith((".", "/", "~")) and "\\" not in source \
        and not os.path.isabs(source) and bool(_REPO_ID.match(source))


def _source_metadata(source_dir: str | os.PathLike | None) -> dict:
    if source_dir is None:
        return {}
    readme = Path(source_dir) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken source card must not stop us; we just know less
        return {}
    out = {k: data[k] for k in _CARRIED_METADATA if data.get(k)}
    out["tags"] = [t for t in data.get("tags") or [] if isinstance(t, str)]
    return out


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


def render_model_card(config: dict, *, source_meta: dict | None = None, fidelity: dict | None = None,
                      repo_id: str | None = None, sentence_transformers: bool = False):
    """Build the ModelCard (not saved) from a fused checkpoint's config.json dict.

    `sentence_transformers`: the checkpoint is also a sentence-transformers model (it has modules.json):
    the card names that library, the sentence-similarity pipeline and shows a SentenceTransformer snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = config.get("mlpfusion") or {}
    source_meta = dict(source_meta or {})
    source = meta.get("source_model")
    base_model = source if _looks_like_hub_id(source) else None
    fidelity = fidelity if fidelity is not None else meta.get("fidelity")

    tags = ["mlp-fusion", "model-compression", "hf-mlpfusion"]
    tags += [t for t in source_meta.pop("tags", []) if t not in tags and t not in ("base_model", "license")]
    pipeline_tag = source_meta.pop("pipeline_tag", None) or pipeline_tag_for(config.get("architectures"))
    library_name = "transformers"
    if sentence_transformers:
        library_name, pipeline_tag = "sentence-transformers", "sentence-similarity"
        tags += [t for t in ("sentence-transformers", "sentence-similarity") if t not in tags]
    card_data = ModelCardData(
        base_model=base_model,
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=tags,
        **source_meta,
    )

    name = repo_id.split("/")[-1] if repo_id else None
    if name is None:
        base = (source or "model").rstrip("/").split("/")[-1]
        ratio = meta.get("ratio")
        name = f"{base}-mlpfusion" + (f"-{ratio:g}" if isinstance(ratio, (int, float)) else "")
    before, after = meta.get("num_parameters_before"), meta.get("num_parameters_after")
    rows = [
        ("Method", f"MLP fusion (`{meta.get('method', 'fusion')}`), k-means clustering of sub-MLPs"),
        ("Source model", f"`{source}`" if source else "—"),
        ("Ratio", _fmt(meta.get("ratio")) if meta.get("ratio") is not None else "—"),
        ("Intermediate size", _fmt(meta.get("intermediate_size"))),
        ("Fused layers", _fmt(meta.get("layers"))),
        ("Count vector folded into the weights", _fmt(meta.get("fold_scale"))),
        ("Parameters before", _fmt(before)),
        ("Parameters after", _fmt(after)),
    ]
    if isinstance(before, int) and isinstance(after, int) and before > 0:
        rows.append(("Parameters removed", f"{before - after:,} ({100 * (before - after) / before:.1f} %)"))
    rows += [("Seed", _fmt(meta.get("seed"))), ("k-means", _fmt(meta.get("kmeans")))]
    if meta.get("clustering"):
        rows.append(("Clustering", "data-aware (statistics of the original MLP inputs on calibration text)"
                     if meta["clustering"] == "data-aware" else "data-free (the paper's)"))
    cal = meta.get("calibration")
    if cal:
        rows.append(("Calibration", f"refit: {_fmt(cal.get('refit'))}, distillation steps: {_fmt(cal.get('distill_steps'))}, "
                                    f"{_fmt(cal.get('samples'))} samples, token weighting: {_fmt(cal.get('weighting', 'uniform'))}"))
    summary_rows = "\n".join(f"| {k} | {v} |" for k, v in rows)

    layers = list(meta.get("layers") or [])
    widths_before, widths_after = list(meta.get("widths_before") or []), list(meta.get("widths_after") or [])
    inertia = list(meta.get("inertia") or [])
    layer_rows = []

    def width(widths: list, i: int, layer: int):  # one entry per fused layer, or one per model layer
        if len(widths) == len(layers):
            return widths[i]
        return widths[layer] if 0 <= layer < len(widths) else None

    for i, layer in enumerate(layers):
        wb, wa = width(widths_before, i, layer), width(widths_after, i, layer)
        layer_rows.append(f"| {layer} | {_fmt(wb)} | {_fmt(wa)} | {_fmt(inertia[i] if i < len(inertia) else None)} |")
    if not layer_rows:
        layer_rows = ["| — | — | — | — |"]

    fidelity_section = ""
    if fidelity:
        fidelity_rows = "\n".join(f"| {_fmt(k)} | {_fmt(v)} |" for k, v in sorted(fidelity.items()))
        fidelity_section = ("## Fidelity\n\nMeasured by `hf-mlpfusion` against the source model:\n\n"
                            f"| measure | value |\n|---|---:|\n{fidelity_rows}\n\n")
    model_type = str(config.get("model_type", ""))
    stock_note = ""
    if not model_type.startswith("mlpfusion"):
        stock_note = ("Here the cluster counts are folded into the weights and every fused layer has the same width, "
                      f"so this is a stock `{model_type}` checkpoint: plain `AutoModel.from_pretrained` works as well.\n\n")

    values = {
        "card_data": card_data.to_yaml(),
        "title": name,
        "source_ref": f"[{source}](https://huggingface.co/{source})" if base_model else (f"`{source}`" if source else "a model"),
        "library_version": str(meta.get("library_version", "")),
        "summary_rows": summary_rows,
        "layer_rows": "\n".join(layer_rows),
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


def write_model_card(folder: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                     fidelity: dict | None = None, repo_id: str | None = None) -> Path:
    """Write folder/README.md from model_cards/mlpfusion.md and folder/config.json.

    Licence, language, datasets, tags and pipeline tag are carried over from source_dir/README.md
    when it exists. Deterministic: same inputs, byte-identical card (no dates, no absolute paths).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HubError(f"{folder} has no config.json: write the model card into a saved checkpoint folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    from .sentence_transformers_files import is_sentence_transformers

    card = render_model_card(config, source_meta=_source_metadata(source_dir), fidelity=fidelity, repo_id=repo_id,
                             sentence_transformers=is_sentence_transformers(folder))
    path = folder / "README.md"
    path.write_text(str(card) if str(card).endswith("\n") else f"{card}\n", encoding="utf-8", newline="\n")
    return path
