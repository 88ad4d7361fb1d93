"""`mlpfusion push REPO_ID [FOLDER]`: publish a folder written by `mlpfusion compress` to the Hub.

Arguments and options are `hf upload`'s (`hf upload REPO_ID [LOCAL_PATH]`). Exit codes: 0 published
(or already up to date), 1 user error (bad folder, bad repo id, the Hub refused), 3 authentication /
permission, 4 network (Hub unreachable after retries; the folder is kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hf_mlpfusion.errors import EXIT_AUTH, EXIT_NETWORK, EXIT_OK, EXIT_USER  # noqa: F401  (documented above)
from hf_mlpfusion.hub import describe, push_folder

from .common import JsonFlag, QuietFlag, VersionFlag, emit_json, fail, flag, progress, refuse_flag_values, user_errors


def _swapped(repo_id: str, folder: Optional[Path]) -> Optional[str]:
    """A hint when the arguments look like `push FOLDER REPO_ID` (this command's order before 0.2)."""
    if not Path(repo_id).expanduser().is_dir():
        return None
    if folder is None:
        return (f"{repo_id} is a folder, not a repo id: the order is `mlpfusion push REPO_ID [FOLDER]`, as in "
                f"`hf upload`; run `mlpfusion push ORG/NAME {repo_id}`")
    if not folder.exists():
        return (f"the arguments are swapped: the order is `mlpfusion push REPO_ID [FOLDER]`, as in `hf upload`; "
                f"run `mlpfusion push {folder} {repo_id}`")
    return None


@user_errors
def push(
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Target repo, e.g. my-org/roberta-base-mlpfusion-0.25 (a name alone goes to the token's user).", show_default=False)],
    folder: Annotated[Optional[Path], typer.Argument(metavar="FOLDER", help="Checkpoint folder written by `mlpfusion compress`. Default: the current folder.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN, then the stored login).", show_default=False)] = None,
    private: Annotated[bool, flag("--private", help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if missing; default main).", show_default=False)] = None,
    create_pr: Annotated[bool, flag("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Commit title.", show_default=False)] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL for self-hosted Hubs (default: HF_ENDPOINT).", show_default=False)] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    version: VersionFlag = None,
) -> None:
    """Upload a compressed checkpoint folder to the Hugging Face Hub; prints the commit or PR URL."""
    refuse_flag_values(repo_id, folder)
    hint = _swapped(repo_id, folder)
    if hint:
        fail(hint, EXIT_USER)
    folder = folder if folder is not None else Path(".")
    with progress(quiet, f"pushing {folder} to {repo_id}"):  # a HubError is one line and its exit code
        result = push_folder(folder, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                             commit_message=commit_message, endpoint=endpoint)
    if as_json:
        from .compress import push_json

        emit_json({**push_json(result), "folder": str(folder)})
    else:
        typer.echo(describe(result))
