"""A local HTTP server that speaks enough of the Hugging Face and ModelScope hub APIs for their real clients.

Point `huggingface_hub` at it with `HF_ENDPOINT=<hub.url>` (or `endpoint=`) and `modelscope` with
`MODELSCOPE_ENDPOINT=<hub.url>`; every request is recorded in `hub.requests` so a test can assert that none was
made. `hub.interrupt[path] = n` cuts the next download of that file after n bytes (connection closed), to test
resumed transfers; `hub.interrupt[path] = (n, k)` does it k times in a row.

    with FakeHub() as hub:
        hub.add_repo("owner/name", {"config.json": b"{}"}, revisions=("main", "v1.0.3"))
        ...
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from fakes.loopback import serve_in_thread, server_url, stop_server


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """Repos live in memory: {repo_id: {revision: {path: bytes}}}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.requests: list[Request] = []
        self.interrupt: dict[str, int | tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    # --- content ----------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path,
                 revisions: tuple[str, ...] = ("main", "master")) -> None:
        """Serve `files` (a mapping or a local folder, read recursively) under each revision name."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes()
                     for p in sorted(files.rglob("*")) if p.is_file()}
        self.repos[repo_id] = {rev: dict(files) for rev in revisions}

    def commit(self, repo_id: str, revision: str) -> str:
        return _sha1(f"{repo_id}@{revision}".encode())

    def _files(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        revs = self.repos.get(repo_id)
        if revs is None:
            return None
        if revision in revs:
            return revs[revision]
        for rev in revs:  # a commit hash names its revision too
            if self.commit(repo_id, rev) == revision:
                return revs[rev]
        return None

    # --- server -----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first (with FakeHub() as hub: ...)"
        return server_url(self._server)

    def start(self) -> FakeHub:
        self._server = serve_in_thread(type("Handler", (_Handler,), {"owner": self}))
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_server(self._server)
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_interrupt(self, path: str) -> int | None:
        with self._lock:
            rule = self.interrupt.pop(path, None)
            if isinstance(rule, tuple):
                cut, times = rule
                if times > 1:
                    self.interrupt[path] = (cut, times - 1)
                return cut
            return rule


# models and datasets (`/api/datasets/...`, `/datasets/<repo>/resolve/...`) share one namespace of repos
HF_INFO = re.compile(r"^/api/(?:models|datasets)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
HF_TREE = re.compile(r"^/api/(?:models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
HF_FILE = re.compile(r"^/(?:datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
MS_FILES = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo/files$")
MS_FILE = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo$")
MS_REVISIONS = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)/revisions$")
MS_INFO = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _hf_error(self, code: str, message: str) -> None:
        self._json({"error": message}, 404 if code != "GatedRepo" else 401,
                   {"X-Error-Code": code, "X-Error-Message": message})

    def _ms_error(self, message: str) -> None:
        self._json({"Code": 10010205001, "Message": message, "Success": False}, 404)

    def _serve_bytes(self, data: bytes, path: str, extra: dict[str, str]) -> None:
        start = 0
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        headers = dict(extra, **{"Accept-Ranges": "bytes"})
        status = 200
        end = len(data)
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        if self.command == "GET":
            cut = self.owner.take_interrupt(path)
            if cut is not None:  # announce the whole body, send part of it, drop the connection
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
        self._send(status, body, headers, "application/octet-stream")

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.owner.record(Request(self.command, self.path, dict(self.headers)))
        for pattern, handler in ((HF_TREE, self._hf_tree), (HF_INFO, self._hf_info), (HF_FILE, self._hf_file),
                                 (MS_FILES, self._ms_files), (MS_FILE, self._ms_file),
                                 (MS_REVISIONS, self._ms_revisions), (MS_INFO, self._ms_info)):
            match = pattern.match(path)
            if match:
                return handler(match, query)
        self._json({"error": f"no route {path}"}, 404)

    do_GET = do_HEAD = do_POST = _dispatch

    # --- Hugging Face -----------------------------------------------------------------------------------------

    def _hf_lookup(self, match) -> tuple[str, str, dict[str, bytes]] | None:
        repo, rev = match["repo"], match.groupdict().get("rev") or "main"
        if repo not in self.owner.repos:
            self._hf_error("RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        files = self.owner._files(repo, rev)
        if files is None:
            self._hf_error("RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, rev, files

    def _hf_info(self, match, query) -> None:
        found = self._hf_lookup(match)
        if found:
            repo, rev, files = found
            self._json({"id": repo, "modelId": repo, "sha": self.owner.commit(repo, rev), "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _hf_tree(self, match, query) -> None:
        found = self._hf_lookup(match)
        if found:
            _, _, files = found
            prefix = (match["path"] or "").strip("/")
            entries = [{"type": "file", "path": p, "size": len(d), "oid": _sha1(d)}
                       for p, d in sorted(files.items()) if not prefix or p.startswith(prefix + "/")]
            self._json(entries)

    def _hf_file(self, match, query) -> None:
        found = self._hf_lookup(match)
        if found:
            repo, rev, files = found
            if match["path"] not in files:
                return self._hf_error("EntryNotFound", f"{match['path']} not found")
            data = files[match["path"]]
            self._serve_bytes(data, match["path"], {"X-Repo-Commit": self.owner.commit(repo, rev),
                                                    "ETag": f'"{_sha1(data)}"'})

    # --- ModelScope -------------------------------------------------------------------------------------------

    def _ms_lookup(self, match, query) -> tuple[str, str, dict[str, bytes]] | None:
        repo = match["repo"]
        rev = (query.get("Revision") or ["master"])[0]
        if repo not in self.owner.repos:
            self._ms_error(f"model {repo} not exists")
            return None
        files = self.owner._files(repo, rev)
        if files is None:
            self._ms_error(f"revision {rev} not exists")
            return None
        return repo, rev, files

    def _ms_files(self, match, query) -> None:
        found = self._ms_lookup(match, query)
        if found:
            repo, rev, files = found
            entries = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(d),
                        "Sha256": _sha256(d), "Revision": self.owner.commit(repo, rev)}
                       for p, d in sorted(files.items())]
            self._json({"Code": 200, "Success": True, "Data": {"Files": entries}})

    def _ms_file(self, match, query) -> None:
        found = self._ms_lookup(match, query)
        if found:
            _, _, files = found
            path = (query.get("FilePath") or [""])[0]
            if path not in files:
                return self._ms_error(f"file {path} not exists")
            self._serve_bytes(files[path], path, {})

    def _ms_revisions(self, match, query) -> None:
        repo = match["repo"]
        if repo not in self.owner.repos:
            return self._ms_error(f"model {repo} not exists")
        revs = [{"Revision": rev, "CreatedAt": 1700000000} for rev in self.owner.repos[repo]]
        self._json({"Code": 200, "Success": True,
                    "Data": {"RevisionMap": {"Branches": revs, "Tags": revs}}})

    def _ms_info(self, match, query) -> None:
        repo = match["repo"]
        if repo not in self.owner.repos:
            return self._ms_error(f"model {repo} not exists")
        self._json({"Code": 200, "Success": True, "Data": {"Path": repo.split("/")[0],
                                                           "Name": repo.split("/")[1]}})
