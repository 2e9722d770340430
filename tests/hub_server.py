"""A small fake of the Hugging Face Hub HTTP API, for offline end-to-end tests of hf_sae.hub.

It implements exactly the endpoints that ``huggingface_hub`` (2.x) calls for the flows hf_sae uses,
so the *real* client runs end to end against it:

=========================================================  ======================================
endpoint                                                    used by
=========================================================  ======================================
``POST /api/repos/create``                                  ``create_repo``
``POST /api/validate-yaml``                                 ``create_commit`` (README.md metadata)
``POST /api/models/{repo}/preupload/{rev}``                 ``create_commit`` (upload mode per file)
``POST /api/models/{repo}/commit/{rev}`` (NDJSON)           ``create_commit``
``GET  /api/models/{repo}[/revision/{rev}]``                ``model_info`` / ``repo_info``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``             ``list_repo_tree``, ``snapshot_download``
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   ``hf_hub_download`` (and transformers)
``GET  /api/whoami-v2``                                     ``whoami``
=========================================================  ======================================

Every file is uploaded as a *regular* (base64-in-the-commit) file: the preupload answer says
``uploadMode: "regular"`` for all of them, which the client accepts for any file type, so no
LFS/Xet endpoint is needed. Blob ids are git blob SHA-1s (what the client computes locally to skip
unchanged files) and are served as ETags; ``X-Repo-Commit`` carries the 40-hex commit id.
Missing repos/revisions/files answer 404 with the ``X-Error-Code`` header the client maps to
``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``.

Blobs are stored under a temporary directory; commits (path -> blob id maps) live in memory.
The server binds 127.0.0.1 on a random free port and serves each request on its own thread.

Usage::

    with FakeHub(tmp_path) as hub:          # hub.url == "http://127.0.0.1:PORT"
        os.environ["HF_ENDPOINT"] = hub.url  # before huggingface_hub is imported, or patch
        ...                                  # huggingface_hub.constants.ENDPOINT in-process
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_id(data: bytes) -> str:
    """Git blob SHA-1 of ``data`` (the id the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, str]  # path -> blob id
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)  # commits[-1] is the head of "main"

    def find(self, rev: str) -> Commit | None:
        if rev in ("main", "HEAD"):
            return self.commits[-1]
        for c in self.commits:
            if c.oid == rev:
                return c
        return None


class FakeHub:
    """The fake Hub: ``start()`` / ``stop()`` (or use as a context manager); ``url`` is its endpoint.

    Attributes: ``requests`` (list of ``(method, path)`` served, for assertions such as "nothing was
    fetched while offline"), ``unhandled`` (requests no route matched), ``repos`` (repo id -> Repo).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ storage
    def put_blob(self, data: bytes) -> str:
        oid = git_blob_id(data)
        path = self.blob_dir / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def new_commit(self, repo: Repo, files: dict[str, str], message: str) -> Commit:
        with self.lock:
            self._counter += 1
            parent = repo.commits[-1].oid if repo.commits else ""
            payload = json.dumps([parent, sorted(files.items()), message, self._counter]).encode()
            commit = Commit(
                oid=hashlib.sha1(payload).hexdigest(),
                files=dict(files),
                message=message,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            )
            repo.commits.append(commit)
            return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private=private)
            self.repos[repo_id] = repo
            gitattributes = self.put_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            self.new_commit(repo, {".gitattributes": gitattributes}, "initial commit")
            return repo


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        with self.hub.lock:
            self.hub.requests.append((method, self.path))
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        routes = [
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("DELETE", r"^/api/repos/delete$", self._delete_repo),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("GET", r"^/api/whoami-v2$", self._whoami),
            # dataset repos (hf_sae.data.hub_cache) share the model routes: /api/datasets/..., /datasets/...
            ("POST", rf"^/api/(?:models|datasets)/{_REPO}/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", rf"^/api/(?:models|datasets)/{_REPO}/commit/(?P<rev>[^/]+)$", self._commit),
            ("GET", rf"^/api/(?:models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", self._tree),
            ("GET", rf"^/api/(?:models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?$", self._model_info),
            ("HEAD", rf"^/(?:datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self._resolve),
            ("GET", rf"^/(?:datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self._resolve),
        ]
        try:
            for m, pattern, handler in routes:
                match = re.match(pattern, path)
                if m == method and match:
                    kwargs = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    handler(method=method, query=query, body=body, **kwargs)
                    return
            with self.hub.lock:
                self.hub.unhandled.append((method, self.path))
            raise _HTTPError(404, f"fake hub: no route for {method} {path}")
        except _HTTPError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers,
                       head=(method == "HEAD"))

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ helpers
    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _HTTPError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, rev: str | None) -> Commit:
        commit = repo.find(rev or "main")
        if commit is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ routes
    def _create_repo(self, method, query, body):
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") not in (None, "model", "dataset"):
            raise _HTTPError(400, "fake hub: only model and dataset repos are supported")
        name, org = payload.get("name"), payload.get("organization") or "test-user"
        repo_id = f"{org}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                raise _HTTPError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, method, query, body):
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or 'test-user'}/{payload.get('name')}"
        with self.hub.lock:
            self._repo(repo_id)
            del self.hub.repos[repo_id]
        self._json(200, {})

    def _validate_yaml(self, method, query, body):
        content = json.loads(body or b"{}").get("content", "")
        errors = []
        m = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _whoami(self, method, query, body):
        self._json(200, {"type": "user", "name": "test-user", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _preupload(self, method, query, repo, rev, body):
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        files = json.loads(body)["files"]
        out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": commit.files.get(f["path"])} for f in files]
        self._json(200, {"files": out, "commitOid": commit.oid})

    def _commit(self, method, query, repo, rev, body):
        if query.get("create_pr"):
            raise _HTTPError(400, "fake hub: pull requests are not supported")
        r = self._repo(repo)
        with self.hub.lock:
            head = self._commit_of(r, rev)
            if head is not r.commits[-1]:
                raise _HTTPError(400, "fake hub: commits only to the head of main")
            files = dict(head.files)
            message = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent and parent != head.oid:
                        raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise _HTTPError(400, "fake hub: files must be base64-encoded")
                    files[value["path"]] = self.hub.put_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: o for p, o in files.items() if not p.startswith(prefix)}
                else:  # lfsFile / copies: never requested, since preupload answers "regular"
                    raise _HTTPError(400, f"fake hub: unsupported commit operation {key!r}")
            commit = self.hub.new_commit(r, files, message)
        self._json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}"})

    def _card_data(self, commit: Commit):
        oid = commit.files.get("README.md")
        if oid is None:
            return None
        m = re.match(r"^---\n(.*?)\n---", self.hub.blob(oid).decode(), flags=re.S)
        return yaml.safe_load(m.group(1)) if m else None

    def _model_info(self, method, query, repo, rev, body):
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        card = self._card_data(commit) or {}
        self._json(200, {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0], "sha": commit.oid, "private": r.private, "disabled": False,
            "gated": False, "lastModified": commit.date, "createdAt": r.commits[0].date,
            "library_name": card.get("library_name"), "tags": card.get("tags") or [],
            "cardData": card or None,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _tree(self, method, query, repo, rev, path, body):
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = (path or "").strip("/")
        base = prefix + "/" if prefix else ""
        if prefix and prefix in commit.files:
            raise _HTTPError(400, f"{prefix} is a file, not a folder")
        entries, folders = [], set()
        for p in sorted(commit.files):
            if not p.startswith(base):
                continue
            rest = p[len(base):]
            parts = rest.split("/")
            for i in range(1, len(parts)):  # folders on the way
                if recursive or i == 1:
                    folders.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                oid = commit.files[p]
                size = (self.hub.blob_dir / oid).stat().st_size
                entries.append({"type": "file", "path": p, "oid": oid, "size": size})
        if prefix and not entries and not folders:
            raise _HTTPError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        dirs = [
            {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
            for f in sorted(folders)
        ]
        self._json(200, dirs + entries)

    def _resolve(self, method, query, repo, rev, path, body):
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        oid = commit.files.get(path)
        if oid is None:
            raise _HTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = self.hub.blob(oid)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        status = 200
        rng = self.headers.get("Range")
        if rng and method == "GET":
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
        if method == "HEAD":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._send(status, data, headers, content_type="application/octet-stream")
