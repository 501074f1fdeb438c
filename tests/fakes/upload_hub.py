"""A local HTTP server that accepts uploads from the real `huggingface_hub` and `modelscope` clients.

It speaks the write side of both hubs, as the clients' own source calls it:
- Hugging Face: POST /api/repos/create, POST /api/validate-yaml, POST /api/models/{repo}/preupload/{rev},
  POST /{repo}.git/info/lfs/objects/batch (basic transfer) + PUT of each blob, POST /api/models/{repo}/commit/{rev}
  (ndjson: regular files inline as base64, LFS files by sha256).
- ModelScope: GET /openapi/v1/models/{repo} and /api/v1/models/{repo}, POST /api/v1/models (create),
  POST /api/v1/repos/models/{repo}/info/lfs/objects/batch + PUT of each blob,
  POST /api/v1/repos/models/{repo}/commit/{rev}.

Files that arrive land in `hub.repos[repo_id][path]` (bytes); every request is kept in `hub.requests` with its
headers so a test can check the token that was sent. Point the clients at it with HF_ENDPOINT=<url> and
MODELSCOPE_ENDPOINT=<url>. A request without the expected bearer token gets 401.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from fakes.loopback import serve_in_thread, server_url, stop_server

LFS_THRESHOLD = 1024  # files at least this large (or binary) go through LFS, as on the real hubs


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass
class UploadHub:
    token: str = "hf_test_token"
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    private: dict[str, bool] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    lfs_paths: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return server_url(self._server)

    def __enter__(self) -> UploadHub:
        self._server = serve_in_thread(type("Handler", (_Handler,), {"owner": self}))
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            stop_server(self._server)

    def authorised(self, seen: Seen) -> bool:
        auth, cookie = seen.header("Authorization") or "", seen.header("Cookie") or ""
        return auth == f"Bearer {self.token}" or f"m_session_id={self.token}" in cookie

    def create(self, repo: str, private: bool) -> bool:
        with self._lock:
            if repo in self.repos:
                return False
            self.repos[repo] = {}
            self.private[repo] = private
            return True

    def store(self, repo: str, path: str, data: bytes) -> None:
        with self._lock:
            self.repos[repo][path] = data


ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "hf_create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "hf_validate"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$"), "hf_preupload"),
    ("POST", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$"), "hf_lfs_batch"),
    ("PUT", re.compile(r"^/lfs-blob/(?P<oid>[0-9a-f]{64})$"), "put_blob"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"), "hf_commit"),
    ("GET", re.compile(r"^/openapi/v1/models/(?P<repo>[^/]+/[^/]+)$"), "ms_openapi_info"),
    ("GET", re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)$"), "ms_info"),
    ("POST", re.compile(r"^/api/v1/models$"), "ms_create"),
    ("POST", re.compile(r"^/api/v1/repos/models/(?P<repo>[^/]+/[^/]+)/info/lfs/objects/batch$"), "ms_lfs_batch"),
    ("POST", re.compile(r"^/api/v1/repos/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"), "ms_commit"),
]


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: UploadHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, payload, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _ms(self, data, status: int = 200, code: int = 200, message: str = "success") -> None:
        self._json({"Code": code, "Data": data, "Message": message, "Success": status == 200,
                    "RequestId": "fake"}, status)

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        seen = Seen(self.command, self.path, dict(self.headers), body)
        self.owner.requests.append(seen)
        for method, pattern, name in ROUTES:
            match = pattern.match(path)
            if method == self.command and match:
                if name not in ("hf_validate", "put_blob", "ms_openapi_info") and \
                        not self.owner.authorised(seen):
                    return self._json({"error": "Invalid credentials in Authorization header"}, 401)
                return getattr(self, name)(match, body)
        self._json({"error": f"no route {self.command} {path}"}, 404)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # --- Hugging Face -----------------------------------------------------------------------------------------

    def hf_create(self, match, body: bytes) -> None:
        payload = json.loads(body)
        repo = f"{payload['organization']}/{payload['name']}"
        if not self.owner.create(repo, payload.get("visibility") == "private"):
            return self._json({"error": "You already created this model repo", "url": f"{self.owner.url}/{repo}"},
                              409)
        self._json({"url": f"{self.owner.url}/{repo}", "name": repo})

    def hf_validate(self, match, body: bytes) -> None:
        self._json({"errors": [], "warnings": []})

    def hf_preupload(self, match, body: bytes) -> None:
        files = json.loads(body)["files"]
        modes = []
        for item in files:
            sample = base64.b64decode(item["sample"])
            lfs = item["size"] >= LFS_THRESHOLD or b"\0" in sample
            modes.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": None})
        self._json({"files": modes})

    def hf_lfs_batch(self, match, body: bytes) -> None:
        objects = json.loads(body)["objects"]
        self._json({"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"],
             "actions": {"upload": {"href": f"{self.owner.url}/lfs-blob/{o['oid']}"}}} for o in objects]})

    def put_blob(self, match, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return self._json({"error": "sha256 mismatch"}, 400)
        self.owner.blobs[match["oid"]] = body
        self._json({})

    def hf_commit(self, match, body: bytes) -> None:
        repo = match["repo"]
        if repo not in self.owner.repos:
            return self._json({"error": "Repository not found"}, 404)
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                self.owner.store(repo, value["path"], base64.b64decode(value["content"]))
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.owner.blobs:
                    return self._json({"error": f"LFS object {value['oid']} was never uploaded"}, 400)
                self.owner.lfs_paths.add(f"{repo}/{value['path']}")
                self.owner.store(repo, value["path"], self.owner.blobs[value["oid"]])
        oid = hashlib.sha1(body).hexdigest()
        self._json({"commitUrl": f"{self.owner.url}/{repo}/commit/{oid}", "commitOid": oid,
                    "success": True})

    # --- ModelScope -------------------------------------------------------------------------------------------

    def ms_openapi_info(self, match, body: bytes) -> None:
        self._ms(None, 404, 10010205001, "model not exists")  # the client then asks the legacy route

    def ms_info(self, match, body: bytes) -> None:
        repo = match["repo"]
        if repo not in self.owner.repos:
            return self._ms(None, 404, 10010205001, f"model {repo} not exists")
        owner, name = repo.split("/")
        self._ms({"Id": 1, "Path": owner, "Name": name, "Visibility": 1 if self.owner.private[repo] else 5})

    def ms_create(self, match, body: bytes) -> None:
        payload = json.loads(body)
        repo = f"{payload['Path']}/{payload['Name']}"
        if not self.owner.create(repo, payload.get("Visibility") == 1):
            return self._ms(None, 400, 10010205002, f"model {repo} already exists")
        self._ms({"Id": 1, "Path": payload["Path"], "Name": payload["Name"]})

    def ms_lfs_batch(self, match, body: bytes) -> None:
        objects = json.loads(body)["objects"]
        answer = []
        for o in objects:  # as in git-lfs: no "actions" when the server already has the object
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.owner.blobs:
                entry["actions"] = {"upload": {"href": f"{self.owner.url}/lfs-blob/{o['oid']}"}}
            answer.append(entry)
        self._ms({"objects": answer})

    def ms_commit(self, match, body: bytes) -> None:
        repo = match["repo"]
        if repo not in self.owner.repos:
            return self._ms(None, 404, 10010205001, f"model {repo} not exists")
        for action in json.loads(body)["actions"]:
            if action.get("type") == "lfs":
                if action["sha256"] not in self.owner.blobs:
                    return self._ms(None, 400, 10010205003, f"blob {action['sha256']} missing")
                self.owner.lfs_paths.add(f"{repo}/{action['path']}")
                self.owner.store(repo, action["path"], self.owner.blobs[action["sha256"]])
            else:
                self.owner.store(repo, action["path"], base64.b64decode(action.get("content") or ""))
        self._ms({"CommitId": hashlib.sha1(body).hexdigest()})
