"""A loopback stand-in for the Hugging Face Hub: what huggingface_hub's `snapshot_download` calls, served from
local directories (one per repo id, each at one fixed commit), with every request recorded.

Tests point `HF_ENDPOINT` at `HubServer.endpoint` so the real client code runs against it:

- GET  /api/models/{repo}/revision/{rev}      model info; `sha` is what a branch name resolves to
- GET  /api/models/{repo}/tree/{rev}[/{dir}]  file listing (`?recursive=true` for the whole tree); LFS files
                                              carry their sha256, as on the Hub
- HEAD, GET /{repo}/resolve/{rev}/{path}      small files: 200 with ETag (the git blob id), X-Repo-Commit and
                                              Content-Length. LFS files: 302 to a second origin standing in for
                                              the CDN, with X-Linked-Etag (the sha256), X-Linked-Size, X-Repo-Commit
- GET  /repos/{repo}/{sha256} on the CDN      the bytes; the client sends no Authorization there

Revisions are "main" or the repo's commit. Errors carry the Hub's X-Error-Code (RepoNotFound,
RevisionNotFound, EntryNotFound), which huggingface_hub turns into its typed errors. With `token` set,
every repo is private: hub requests without `Authorization: Bearer <token>` get 401 RepoNotFound.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".wav")
"""Stored with git-lfs, as the Hub's default .gitattributes does for binaries."""

API_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<dir>.*))?$")
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
CDN_ROUTE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/(?P<sha256>[0-9a-f]{64})$")


@dataclass(frozen=True)
class Request:
    """One request as the server saw it; `origin` is "hub" or "cdn"."""

    origin: str
    method: str
    path: str
    authorization: str | None


@dataclass(frozen=True)
class RepoFile:
    """A file of a served repo: where its bytes are, and the ids the Hub gives it."""

    repo: str
    path: str
    file: Path
    size: int
    blob_id: str
    sha256: str | None  # LFS files only

    def tree_entry(self) -> dict[str, Any]:
        """The entry the Hub's tree API gives: an LFS file's `oid` is its pointer's blob id."""
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            pointer_size = len(_lfs_pointer(self.sha256, self.size))
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return entry


@dataclass(frozen=True)
class Repo:
    """A served repo: a directory's files at one commit."""

    commit: str
    files: dict[str, RepoFile]

    @classmethod
    def from_dir(cls, repo_id: str, directory: Path, commit: str) -> Repo:
        files = {}
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            path, data = file.relative_to(directory).as_posix(), file.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else None
            stored = data if sha256 is None else _lfs_pointer(sha256, len(data))
            files[path] = RepoFile(repo_id, path, file, len(data), _git_blob_id(stored), sha256)
        return cls(commit, files)

    def folders(self) -> list[str]:
        return sorted({"/".join(path.split("/")[:i]) for path in self.files for i in range(1, path.count("/") + 1)})


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Hub and CDN origins on 127.0.0.1 (ephemeral ports), serving `repos` (repo id -> (directory, commit sha)).

    Use as a context manager. `requests` lists what the client asked for, `downloads` the (repo id, path) of
    every file whose bytes were sent, both in order of arrival."""

    def __init__(self, repos: Mapping[str, tuple[Path, str]], token: str | None = None) -> None:
        self.repos = {repo_id: Repo.from_dir(repo_id, Path(directory), commit)
                      for repo_id, (directory, commit) in repos.items()}
        self.token = token
        self.requests: list[Request] = []
        self.downloads: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._hub = _OriginServer(self, "hub")
        self._cdn = _OriginServer(self, "cdn")
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._hub, self._cdn)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def record_download(self, file: RepoFile) -> None:
        with self._lock:
            self.downloads.append((file.repo, file.path))

    def __enter__(self) -> HubServer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()


class _OriginServer(ThreadingHTTPServer):
    """One origin (the hub's or the CDN's) of a HubServer."""

    daemon_threads = True

    def __init__(self, hub: HubServer, origin: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.origin = hub, origin


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    server: _OriginServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `HubServer.requests` instead."""

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        request = Request(self.server.origin, self.command, path, self.headers.get("Authorization"))
        hub.record(request)
        if request.origin == "cdn":
            self._cdn(hub, path, body)
            return
        if hub.token is not None and request.authorization != f"Bearer {hub.token}":
            self._error(401, "RepoNotFound", "Repository not found", body)
            return
        if match := API_ROUTE.match(path):
            self._api(hub, match, parse_qs(url.query), body)
        elif match := RESOLVE_ROUTE.match(path):
            self._resolve(hub, match, body)
        else:
            self._error(404, None, "Not found", body)

    def _repo(self, hub: HubServer, repo_id: str, revision: str, body: bool) -> Repo | None:
        """The repo at `revision`, or None after answering the Hub's error for an unknown repo or revision."""
        repo = hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
        elif revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        else:
            return repo
        return None

    def _api(self, hub: HubServer, match: re.Match[str], query: dict[str, list[str]], body: bool) -> None:
        repo_id = match["repo"]
        repo = self._repo(hub, repo_id, match["rev"], body)
        if repo is None:
            return
        if match["kind"] == "revision":
            info = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                    "gated": False, "disabled": False, "siblings": [{"rfilename": p} for p in repo.files]}
            self._json(info, body)
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{match['dir'].strip('/')}/" if match["dir"] else ""
        # a folder's oid (its git tree id) is never used by the client: any stable id does
        entries = [{"type": "directory", "oid": _git_blob_id(d.encode()), "size": 0, "path": d} for d in repo.folders()]
        entries += [f.tree_entry() for f in repo.files.values()]
        self._json([e for e in entries if e["path"].startswith(prefix)
                    and (recursive or "/" not in e["path"][len(prefix):])], body)

    def _resolve(self, hub: HubServer, match: re.Match[str], body: bool) -> None:
        repo = self._repo(hub, match["repo"], match["rev"], body)
        if repo is None:
            return
        file = repo.files.get(match["path"])
        if file is None:
            self._error(404, "EntryNotFound", f"{match['path']} does not exist", body, {"X-Repo-Commit": repo.commit})
            return
        if file.sha256 is not None:
            self.send_response(302)
            self._headers({"Location": f"{hub.cdn}/repos/{file.repo}/{file.sha256}", "X-Repo-Commit": repo.commit,
                           "ETag": f'"{file.blob_id}"', "X-Linked-Etag": f'"{file.sha256}"',
                           "X-Linked-Size": str(file.size), "Content-Length": "0"})
            return
        self._file(file, body, {"X-Repo-Commit": repo.commit, "ETag": f'"{file.blob_id}"'})

    def _cdn(self, hub: HubServer, path: str, body: bool) -> None:
        match = CDN_ROUTE.match(path)
        repo = hub.repos.get(match["repo"]) if match else None
        files = [f for f in repo.files.values() if f.sha256 == match["sha256"]] if repo and match else []
        if files:
            self._file(files[0], body, {"ETag": f'"{files[0].sha256}"'})
        else:
            self._error(404, None, "Not found", body)

    def _file(self, file: RepoFile, body: bool, headers: dict[str, str]) -> None:
        self.send_response(200)
        self._headers({**headers, "Content-Type": "application/octet-stream", "Content-Length": str(file.size)})
        if body:
            with file.file.open("rb") as f:
                shutil.copyfileobj(f, self.wfile)
            self.server.hub.record_download(file)

    def _json(self, value: Any, body: bool) -> None:
        self._send(200, json.dumps(value).encode(), "application/json", body, {})

    def _error(self, status: int, code: str | None, message: str, body: bool,
               headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._send(status, json.dumps({"error": message}).encode(), "application/json", body, extra)

    def _send(self, status: int, data: bytes, content_type: str, body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        self._headers({**headers, "Content-Type": content_type, "Content-Length": str(len(data))})
        if body:
            self.wfile.write(data)

    def _headers(self, headers: Mapping[str, str]) -> None:
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
