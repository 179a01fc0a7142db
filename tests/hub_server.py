"""A fake Hugging Face Hub on 127.0.0.1: the routes `huggingface_hub` uses to push a model, nothing more.

It records every request (path, headers, JSON / NDJSON body) and keeps repos, branches and committed
file bytes in memory, so tests can assert exactly what arrived where. Permissions follow the real Hub:
an unknown bearer token is a 401 on every route, creating or committing outside your namespace (or in an
org where you only read) is a 403, creating an existing repo is a 409, an invisible repo is a 404.
Uploads must be inline (`uploadMode: regular`, what preupload answers); LFS is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass
class User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> role in org: admin | write | read
    role: str = "write"  # token role: write | read


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]  # what this commit added, path -> bytes
    oid: str


@dataclass
class Request:
    method: str
    path: str  # without the query string, percent-encoding kept
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    json: Any = None  # parsed JSON body, or the list of NDJSON lines of a commit

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


def git_blob_sha1(data: bytes) -> str:
    """The git object id the Hub reports for a regular file (what the client compares to skip no-ops)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def front_matter(text: str) -> str | None:
    if not text.startswith("---"):
        return None
    parts = text.split("\n---", 1)
    return parts[0][3:] if len(parts) == 2 else None


class _Reply(Exception):
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class FakeHub:
    """Start with `with FakeHub(users) as hub:`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self, users: dict[str, User] | None = None) -> None:
        self.users = dict(users or {})
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.commits: list[Commit] = []
        self.reject_card: str | None = None  # validate-yaml answers 400 with this message
        self.fail_commit: tuple[int, str] | None = None  # the commit route answers this error
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
            timeout = 30

            def do_GET(self) -> None:
                hub._serve(self)

            def do_POST(self) -> None:
                hub._serve(self)

            def do_PUT(self) -> None:
                hub._serve(self)

            def do_DELETE(self) -> None:
                hub._serve(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- state helpers for tests

    def add_repo(self, repo_id: str, private: bool = True, files: dict[str, bytes] | None = None) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private)
            repo.branches["main"] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.branches["main"].update(files or {})
            repo.heads["main"] = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
            self.repos[repo_id] = repo
            return repo

    def hits(self, route_prefix: str = "") -> list[Request]:
        """Requests whose "METHOD /path" starts with `route_prefix` (ignoring the harmless agent registry)."""
        return [
            r for r in self.requests if r.route.startswith(route_prefix) and not r.path.endswith("/agent-harnesses")
        ]

    # ---------------------------------------------------------------- HTTP plumbing

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        split = urlsplit(h.path)
        req = Request(h.command, split.path, parse_qs(split.query), {k.lower(): v for k, v in h.headers.items()}, body)
        try:
            if h.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                req.json = [json.loads(line) for line in body.splitlines() if line.strip()]
            elif body:
                req.json = json.loads(body)
        except ValueError:
            req.json = None
        with self.lock:
            self.requests.append(req)
            try:
                status, payload, headers = 200, self._route(req), {}
            except _Reply as reply:
                status, payload, headers = reply.status, reply.body, reply.headers
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    h.rfile.readline()
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    # ---------------------------------------------------------------- auth

    def _user(self, req: Request) -> User | None:
        auth = req.headers.get("authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.users.get(token)
        if user is None:
            raise _error(401, INVALID_CREDENTIALS)
        return user

    @staticmethod
    def _can_read(user: User | None, repo: Repo) -> bool:
        ns = repo.id.split("/")[0]
        return not repo.private or (user is not None and (ns == user.name or ns in user.orgs))

    @staticmethod
    def _can_write(user: User | None, namespace: str) -> bool:
        if user is None or user.role != "write":
            return False
        return namespace == user.name or user.orgs.get(namespace) in ("admin", "write")

    def _writable(self, user: User | None, repo_id: str, revision: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or not self._can_read(user, repo):
            raise _error(404, "Repository not found", "RepoNotFound")
        if not self._can_write(user, repo_id.split("/")[0]):
            raise _error(403, f"You don't have write access to {repo_id}")
        if revision is not None and revision not in repo.branches:
            raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo

    # ---------------------------------------------------------------- routes

    def _route(self, req: Request) -> Any:
        parts = [unquote(p) for p in req.path.split("/")[1:]]
        if parts == ["api", "agent-harnesses"]:
            return {"standardEnvVars": [], "harnesses": {}}
        user = self._user(req)
        if req.method == "GET" and parts == ["api", "whoami-v2"]:
            return self._whoami(user)
        if req.method == "POST" and parts == ["api", "repos", "create"]:
            return self._create(user, req.json or {})
        if req.method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml((req.json or {}).get("content", ""))
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if req.method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                return self._repo_info(user, repo_id, rest[1] if rest else "main")
            if req.method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(user, repo_id, rest[1], req.json or {})
            if req.method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(user, repo_id, rest[1], req.json or [])
            if req.method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._branch(user, repo_id, rest[1], req.json or {})
        raise _error(404, f"fake hub has no route {req.method} {req.path}")

    def _whoami(self, user: User | None) -> Any:
        if user is None:
            raise _error(401, INVALID_CREDENTIALS)
        return {
            "type": "user",
            "name": user.name,
            "fullname": user.name.title(),
            "orgs": [{"type": "org", "name": org, "roleInOrg": role} for org, role in user.orgs.items()],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.role}},
        }

    def _create(self, user: User | None, body: dict[str, Any]) -> Any:
        if user is None:
            raise _error(401, INVALID_CREDENTIALS)
        if body.get("type") not in (None, "model"):
            raise _error(400, "fake hub only hosts models")
        namespace = body.get("organization") or user.name
        repo_id = f"{namespace}/{body['name']}"
        if not self._can_write(user, namespace):
            raise _error(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        self.add_repo(repo_id, private=private)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex[:24]}

    def _validate_yaml(self, content: str) -> Any:
        if self.reject_card is not None:
            raise _Reply(400, {"errors": [{"message": self.reject_card}], "warnings": []})
        block = front_matter(content)
        try:
            meta = yaml.safe_load(block) if block is not None else None
        except yaml.YAMLError as exc:
            raise _Reply(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []}) from None
        warnings = [] if isinstance(meta, dict) else [{"message": "empty or missing yaml metadata in repo card"}]
        return {"errors": [], "warnings": warnings}

    def _repo_info(self, user: User | None, repo_id: str, revision: str) -> Any:
        repo = self.repos.get(repo_id)
        if repo is None or not self._can_read(user, repo):
            raise _error(404, "Repository not found", "RepoNotFound")
        if revision not in repo.branches:
            raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return {
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "private": repo.private,
            "sha": repo.heads[revision],
            "siblings": [{"rfilename": f} for f in sorted(repo.branches[revision])],
        }

    def _preupload(self, user: User | None, repo_id: str, revision: str, body: dict[str, Any]) -> Any:
        repo = self._writable(user, repo_id, revision)
        files = repo.branches[revision]
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
                }
                for f in body.get("files", [])
            ],
            "commitOid": repo.heads[revision],
        }

    def _commit(self, user: User | None, repo_id: str, revision: str, lines: list[dict[str, Any]]) -> Any:
        repo = self._writable(user, repo_id, revision)
        if self.fail_commit is not None:
            raise _error(*self.fail_commit)
        if not lines or lines[0].get("key") != "header":
            raise _error(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _error(400, "fake hub expects base64 content")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                raise _error(400, f"fake hub does not support {key} operations (keep uploads regular)")
        branch = repo.branches[revision]
        for path in deleted:
            branch.pop(path, None)
        branch.update(added)
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.heads[revision] = oid
        self.commits.append(
            Commit(repo_id, revision, header.get("summary", ""), header.get("description", ""), added, oid)
        )
        return {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "success": True,
            "pullRequestUrl": None,
        }

    def _branch(self, user: User | None, repo_id: str, branch: str, body: dict[str, Any]) -> Any:
        repo = self._writable(user, repo_id, None)
        if branch in repo.branches:
            raise _error(409, "Reference already exists")
        start = body.get("startingPoint") or "main"
        if start not in repo.branches:
            raise _error(404, f"Invalid rev id: {start}", "RevisionNotFound")
        repo.branches[branch] = dict(repo.branches[start])
        repo.heads[branch] = repo.heads[start]
        return {}
