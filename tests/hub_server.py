"""A small Hugging Face Hub look-alike for tests: stdlib HTTP server on 127.0.0.1, in-memory storage.

Test infrastructure, not part of the package. It speaks the subset of the Hub protocol that the real
`huggingface_hub` client (and `transformers` through it) uses to create repos, commit files (regular
and LFS), open pull requests and download files:

    GET  /api/whoami-v2
    POST /api/repos/create                         {name, organization, visibility|private, type}
    POST /api/validate-yaml
    GET  /api/models/{ns}/{name}[/revision/{rev}]   sha, private, siblings (with lfs: size/sha256/pointerSize)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]?recursive=
    GET  /api/models/{ns}/{name}/commits/{rev}
    GET  /api/models/{ns}/{name}/refs[?include_prs=1]
    POST /api/models/{ns}/{name}/branch/{branch}     create a branch (startingPoint, default main)
    POST /api/models/{ns}/{name}/preupload/{rev}    -> uploadMode "regular" | "lfs" (by size / extension), oid
    POST /api/models/{ns}/{name}/commit/{rev}[?create_pr=1]   NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    POST /{ns}/{name}.git/info/lfs/objects/batch    LFS batch API ("basic" transfer)
    PUT  /_lfs/upload/{ns}/{name}/{oid}             upload URL handed out by the batch API
    POST /_lfs/verify/{ns}/{name}                   verify URL handed out by the batch API
    GET|HEAD /{ns}/{name}/resolve/{rev}/{path}      X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size

Xet is never offered: the server answers "regular"/"lfs" in preupload and sends no Xet headers on
downloads. Clients must still run with Xet disabled for uploads (`HF_HUB_DISABLE_XET=1`, or
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`), because a client with `hf_xet` installed
routes LFS uploads through Xet without asking.

Git-like model: a commit is an immutable snapshot {path: FileEntry} plus parent, title and message;
its oid is the sha1 of that content (parent, tree, title, message), so equal content gives equal
oids. Branches and PR refs (`refs/pr/N`) point at commits. Tokens are a fixed table.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

# token -> (user name, organisations with write access, token role)
DEFAULT_TOKENS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "hf_test_alice_write": ("alice", ("my-org",), "write"),
    "hf_test_bob_write": ("bob", (), "write"),
    "hf_test_alice_read": ("alice", ("my-org",), "read"),
}
WRITE_TOKEN = "hf_test_alice_write"
OTHER_WRITE_TOKEN = "hf_test_bob_write"
READ_TOKEN = "hf_test_alice_read"

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npz", ".gguf")
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS).encode()
DATE = "2024-01-01T00:00:00.000Z"  # fixed: the server is deterministic


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    size: int
    oid: str  # git blob oid (of the pointer file for LFS files)
    content: bytes | None = None  # regular files
    lfs_sha256: str | None = None  # LFS files: content lives in the server's LFS store
    pointer_size: int | None = None

    @classmethod
    def regular(cls, data: bytes) -> "FileEntry":
        return cls(size=len(data), oid=git_blob_oid(data), content=data)

    @classmethod
    def lfs(cls, sha256: str, size: int) -> "FileEntry":
        pointer = lfs_pointer(sha256, size)
        return cls(size=size, oid=git_blob_oid(pointer), lfs_sha256=sha256, pointer_size=len(pointer))


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    message: str
    author: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    prs: dict[int, str] = field(default_factory=dict)  # number -> commit oid (ref refs/pr/N)
    commits: dict[str, Commit] = field(default_factory=dict)


class HubState:
    """Everything the fake Hub knows; guarded by one lock."""

    def __init__(self, tokens=None, lfs_threshold: int = 10 * 1024 * 1024):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> content
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, path) log, handy in tests
        self.discussion_counter: dict[str, int] = {}
        self.fail_next = 0  # answer the next N requests with 503 (to test client retries)

    # -- git-ish helpers -------------------------------------------------------------------------
    def make_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str, message: str,
                    author: str) -> Commit:
        tree = sorted((path, entry.oid) for path, entry in files.items())
        oid = hashlib.sha1(json.dumps([parent, tree, title, message]).encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, files=dict(files), title=title, message=message, author=author)
        repo.commits[oid] = commit
        return commit

    def resolve(self, repo: Repo, rev: str) -> Commit | None:
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in repo.prs:
            return repo.commits[repo.prs[int(m.group(1))]]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/"):] in repo.branches:
            return repo.commits[repo.branches[rev[len("refs/heads/"):]]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo.commits:
            return repo.commits[rev]
        return None

    def is_lfs(self, path: str, size: int) -> bool:
        return size >= self.lfs_threshold or path.endswith(LFS_EXTENSIONS)

    def commit_count(self, repo_id: str, rev: str = "main") -> int:
        """Number of commits reachable from `rev` (what `list_repo_commits` returns)."""
        with self.lock:
            repo = self.repos[repo_id]
            commit, n = self.resolve(repo, rev), 0
            while commit is not None:
                n += 1
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return n


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        return self.server.url

    def _read_body(self) -> bytes:
        return self._body

    def _read_raw_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, err: HubError):
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers)

    def _user(self) -> tuple[str, tuple[str, ...], str] | None:
        """The token's (user, orgs, role); None when anonymous; 401 on a token the server doesn't know."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else auth
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def _can_write(self, user, namespace: str) -> bool:
        return user is not None and user[2] == "write" and (namespace == user[0] or namespace in user[1])

    def _repo(self, repo_id: str, write: bool = False) -> tuple[Repo, tuple | None]:
        user = self._user()
        repo = self.state.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        visible = repo is not None and (not repo.private or (user is not None and (
            namespace == user[0] or namespace in user[1])))
        if not visible:
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write and not self._can_write(user, namespace):
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    def _rev(self, repo: Repo, rev: str) -> Commit:
        commit = self.state.resolve(repo, rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _dispatch(self):
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = split.path.split("/")[1:]  # raw (still percent-encoded) segments
        self._body = self._read_raw_body()  # always drain the body: keeps keep-alive connections in sync
        with self.state.lock:
            self.state.requests.append((self.command, split.path))
        try:
            with self.state.lock:
                if self.state.fail_next > 0:
                    self.state.fail_next -= 1
                    raise HubError(503, "Service temporarily unavailable")
                self._route(segments, query)
        except HubError as err:
            self._error(err)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = lambda self: self._dispatch()  # noqa: E731

    # -- routes ----------------------------------------------------------------------------------
    def _route(self, seg: list[str], query: dict):
        method = self.command
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(self._read_body() or b"{}"))
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            self._read_body()
            return self._json(200, {"errors": [], "warnings": []})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] == "models":
            repo_id = f"{unquote(seg[2])}/{unquote(seg[3])}"
            rest = seg[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, "main", query)
            if len(rest) >= 2 and rest[0] == "revision" and method == "GET":
                return self._model_info(repo_id, unquote("/".join(rest[1:])), query)
            if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                path = unquote("/".join(rest[2:])) if len(rest) > 2 else ""
                return self._tree(repo_id, unquote(rest[1]), path, query)
            if len(rest) == 2 and rest[0] == "commits" and method == "GET":
                return self._commits(repo_id, unquote(rest[1]))
            if len(rest) >= 2 and rest[0] == "branch" and method == "POST":
                return self._create_branch(repo_id, unquote("/".join(rest[1:])), json.loads(self._body or b"{}"))
            if rest == ["refs"] and method == "GET":
                return self._refs(repo_id, query)
            if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_id, unquote(rest[1]), json.loads(self._read_body()), query)
            if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                return self._commit(repo_id, unquote(rest[1]), self._read_body(), query)
        if seg[:2] == ["_lfs", "upload"] and len(seg) == 5 and method == "PUT":
            return self._lfs_upload(f"{seg[2]}/{seg[3]}", seg[4])
        if seg[:2] == ["_lfs", "verify"] and len(seg) == 4 and method == "POST":
            return self._lfs_verify(f"{seg[2]}/{seg[3]}", json.loads(self._read_body()))
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{unquote(seg[0])}/{unquote(seg[1][:-4])}", json.loads(self._read_body()))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
            return self._resolve(repo_id, unquote(seg[3]), unquote("/".join(seg[4:])))
        self._read_body()
        raise HubError(404, f"Not found: {method} {self.path}")

    def _whoami(self):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        name, orgs, role = user
        self._json(200, {
            "type": "user", "id": f"id-{name}", "name": name, "fullname": name.title(),
            "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": f"{name}-{role}", "role": role}},
        })

    def _create_repo(self, payload: dict):
        user = self._user()
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "This test server only hosts model repos")
        namespace = payload.get("organization") or (user[0] if user else None)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_id = f"{namespace}/{payload['name']}"
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        url = f"{self.base}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url},
                              {"X-Error-Message": "You already created this model repo"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, private=private, owner=user[0])
        initial = self.state.make_commit(repo, None, {".gitattributes": FileEntry.regular(GITATTRIBUTES)},
                                         "initial commit", "", user[0])
        repo.branches["main"] = initial.oid
        self.state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": f"repo-{repo_id}"})

    def _sibling(self, path: str, entry: FileEntry) -> dict:
        sib = {"rfilename": path, "size": entry.size, "blobId": entry.oid}
        if entry.lfs_sha256:
            sib["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256, "pointerSize": entry.pointer_size}
        return sib

    def _model_info(self, repo_id: str, rev: str, query: dict):
        repo, _ = self._repo(repo_id)
        commit = self._rev(repo, rev)
        self._json(200, {
            "_id": f"repo-{repo_id}", "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.oid, "lastModified": DATE, "createdAt": DATE, "private": repo.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [self._sibling(p, e) for p, e in sorted(commit.files.items())],
        })

    def _tree(self, repo_id: str, rev: str, path: str, query: dict):
        repo, _ = self._repo(repo_id)
        commit = self._rev(repo, rev)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = f"{path.rstrip('/')}/" if path else ""
        if path and path not in {p for f in commit.files for p in _parents(f)}:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        entries, folders = [], set()
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rel = file_path[len(prefix):]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            if recursive:
                folders.update(p for p in _parents(file_path) if p.startswith(prefix) and p != path)
            item = {"type": "file", "path": file_path, "size": entry.size, "oid": entry.oid}
            if entry.lfs_sha256:
                item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            entries.append(item)
        tree_oid = hashlib.sha1(commit.oid.encode()).hexdigest()
        entries += [{"type": "directory", "path": f, "oid": tree_oid} for f in sorted(folders)]
        self._json(200, entries)

    def _commits(self, repo_id: str, rev: str):
        repo, _ = self._repo(repo_id)
        commit, out = self._rev(repo, rev), []
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": commit.message, "date": DATE,
                        "authors": [{"user": commit.author}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, out)

    def _refs(self, repo_id: str, query: dict):
        repo, _ = self._repo(repo_id)
        prs = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": oid} for n, oid in sorted(repo.prs.items())]
        self._json(200, {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in sorted(repo.branches.items())],
            "converts": [], "tags": [], "pullRequests": prs if query.get("include_prs") else None,
        })

    def _create_branch(self, repo_id: str, branch: str, payload: dict):
        repo, _ = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = self._rev(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._json(200, {"success": True})

    def _preupload(self, repo_id: str, rev: str, payload: dict, query: dict):
        repo, _ = self._repo(repo_id, write=True)
        commit = self._rev(repo, rev)
        files = []
        for f in payload["files"]:
            mode = "lfs" if self.state.is_lfs(f["path"], f["size"]) and f["size"] > 0 else "regular"
            item = {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
            existing = commit.files.get(f["path"])
            if existing is not None:
                item["oid"] = existing.lfs_sha256 if existing.lfs_sha256 else existing.oid
            files.append(item)
        self._json(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict):
        repo, user = self._repo(repo_id, write=True)
        create_pr = query.get("create_pr") in ("1", "true", "True")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First line of the payload must be the header")
        header = lines[0]["value"]
        if create_pr and rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = self._rev(repo, rev)
        if header.get("parentCommit") and header["parentCommit"] != head.oid and not create_pr:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                files[path] = FileEntry.regular(data)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in self.state.lfs_store:
                    raise HubError(400, f"LFS object {oid} for {path} was not uploaded")
                files[path] = FileEntry.lfs(oid, len(self.state.lfs_store[oid]))
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"Unknown commit operation {key}")
        commit = self.state.make_commit(repo, head.oid, files, header.get("summary", ""),
                                        header.get("description", ""), user[0])
        pr_url = None
        if create_pr:
            num = self.state.discussion_counter.get(repo_id, 0) + 1
            self.state.discussion_counter[repo_id] = num
            repo.prs[num] = commit.oid
            pr_url = f"{self.base}/{repo_id}/discussions/{num}"
        elif rev in repo.branches:
            repo.branches[rev] = commit.oid
        elif (m := re.fullmatch(r"refs/pr/(\d+)", rev)) and int(m.group(1)) in repo.prs:
            repo.prs[int(m.group(1))] = commit.oid
        else:
            raise HubError(400, f"Cannot commit to {rev}: not a branch or pull request")
        self._json(200, {"success": True, "commitOid": commit.oid,
                         "commitUrl": f"{self.base}/{repo_id}/commit/{commit.oid}", "pullRequestUrl": pr_url})

    def _lfs_batch(self, repo_id: str, payload: dict):
        repo, _ = self._repo(repo_id, write=payload.get("operation") == "upload")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size, "authenticated": True}
            if payload.get("operation") == "upload":
                if oid not in self.state.lfs_store:
                    item["actions"] = {
                        "upload": {"href": f"{self.base}/_lfs/upload/{quote(repo_id)}/{oid}"},
                        "verify": {"href": f"{self.base}/_lfs/verify/{quote(repo_id)}", "header": {}},
                    }
            elif oid in self.state.lfs_store:
                item["actions"] = {"download": {"href": f"{self.base}/_lfs/download/{oid}"}}
            else:
                item["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, repo_id: str, oid: str):
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded content does not match the oid")
        self.state.lfs_store[oid] = data
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, repo_id: str, payload: dict):
        self._repo(unquote(repo_id), write=True)
        data = self.state.lfs_store.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, "Object not found or of wrong size")
        self._json(200, {"success": True})

    def _resolve(self, repo_id: str, rev: str, path: str):
        repo, _ = self._repo(repo_id)
        commit = self._rev(repo, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = entry.content if entry.content is not None else self.state.lfs_store[entry.lfs_sha256]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes"}
        if entry.lfs_sha256:
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class HubServer(ThreadingHTTPServer):
    """`with HubServer() as hub: HfApi(endpoint=hub.url, token=WRITE_TOKEN)...`; port 0 picks a free port."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: HubState | None = None):
        super().__init__((host, port), Handler)
        self.state = state or HubState()
        self.url = f"http://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual poking: python tests/hub_server.py 8765
    import sys

    srv = HubServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"fake Hub on {srv.url}; tokens: {', '.join(srv.state.tokens)}")
    srv.serve_forever()
