"""`mlpfusion push DIR REPO_ID`: publish a folder written by `mlpfusion compress` to the Hub.

Options are named as `hf upload` names them. Exit codes: 0 published (or already up to date),
1 user error (bad folder, bad repo id, the Hub refused), 3 authentication / permission,
4 network (Hub unreachable after retries; the folder is kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hf_mlpfusion.errors import EXIT_AUTH, EXIT_NETWORK, EXIT_OK, EXIT_USER  # noqa: F401  (documented above)
from hf_mlpfusion.hub import describe, push_folder

from .common import user_errors


@user_errors  # the one error mapping of every command: one red line, the error's exit code
def push(
    folder: Annotated[Path, typer.Argument(help="Checkpoint folder written by `mlpfusion compress`.")],
    repo_id: Annotated[str, typer.Argument(help="Target repo, e.g. my-org/roberta-base-mlpfusion-0.25.")],
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN, then the stored login).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if missing; default main).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Commit title.")] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL for self-hosted Hubs (default: HF_ENDPOINT).")] = None,
) -> None:
    """Upload a compressed checkpoint folder to the Hugging Face Hub; prints the commit or PR URL."""
    result = push_folder(folder, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, endpoint=endpoint)
    typer.echo(describe(result))
