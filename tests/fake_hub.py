"""A loopback Hugging Face Hub for the endpoints huggingface_hub 1.17 uses to publish.

Read from huggingface_hub/hf_api.py and _commit_api.py:
  GET  /api/whoami-v2                                  -> user, orgs, auth.accessToken.role
  POST /api/repos/create {"name","organization","visibility","type"} -> {"url"} | 409 exists
  POST /api/models/{repo}/branch/{branch}             -> 200 | 409 exists
  GET  /api/models/{repo}[/revision/{rev}]            -> ModelInfo ({"id","sha","private","tags","siblings"})
  POST /api/validate-yaml {"content","repoType"}       -> {"errors": [], "warnings": []}
  POST /api/models/{repo}/preupload/{rev} {"files": [{"path","sample","size"}]}
                                                       -> {"files": [{"path","uploadMode","shouldIgnore","oid"}]}
  POST /api/models/{repo}/commit/{rev}  (NDJSON: header, file{content base64}, deletedFile, ...)
                                                       -> {"commitUrl","commitOid","pullRequestUrl"}
And what hf_hub_download needs (file_download.py, utils/_http.py hf_raise_for_status):
  HEAD|GET /{repo}/resolve/{revision}/{filename}      -> 200, X-Repo-Commit, ETag, Content-Length (+ body on GET);
                                                        revision: a branch or a head's commit id
        a missing file: 404 X-Error-Code: EntryNotFound (with X-Repo-Commit); a missing repo (or a
        private one the token cannot read): 404 X-Error-Code: RepoNotFound; a gated repo without
        access: 401/403 X-Error-Code: GatedRepo; a token the Hub does not know: 401
        X-Error-Message: Invalid credentials in Authorization header. Reading needs no token.
Every file is negotiated as a "regular" upload (base64 in the commit), so no LFS or
Xet transfer is needed. Tokens come as `Authorization: Bearer <token>`.
Failures can be injected per operation: `fake.fail["commit"] = [503, 503]`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users who accepted a gated repo's terms


def user(name: str, *, role: str = "write", orgs: tuple[tuple[str, str], ...] = (), fine_grained: dict | None = None) -> dict:
    access = {"displayName": f"{name}-token", "role": role}
    if fine_grained is not None:
        access["fineGrained"] = fine_grained
    return {
        "type": "user",
        "name": name,
        "orgs": [{"name": org, "roleInOrg": org_role} for org, org_role in orgs],
        "auth": {"type": "access_token", "accessToken": access},
    }


class FakeHub:
    def __init__(self):
        self.tokens: dict[str, dict] = {}
        self.repos: dict[str, Repo] = {}
        self.fail: dict[str, list[int]] = {}
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    def add_model(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False, private: bool = False,
                  granted: tuple[str, ...] = ()) -> Repo:
        """A model repo to download from, its head a commit of `files`."""
        repo = self.repos[repo_id] = Repo(id=repo_id, private=private, gated=gated, granted=set(granted))
        repo.branches["main"] = dict(files)
        repo.heads["main"] = hashlib.sha1(json.dumps(sorted((k, git_blob_oid(v)) for k, v in files.items())).encode()).hexdigest()
        return repo

    def downloads(self) -> list[str]:
        """The files asked for through /resolve/ (HEAD or GET), in order."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for op, path in self.calls if op == "resolve"]

    def count(self, op: str) -> int:
        return sum(1 for name, _ in self.calls if name == op)

    # ------------------------------------------------------------- operations
    def _writable(self, who: dict, namespace: str) -> bool:
        role = who["auth"]["accessToken"]["role"]
        if role == "read":
            return False
        if namespace == who["name"]:
            return True
        return any(o["name"] == namespace and o["roleInOrg"] in ("admin", "write", "contributor") for o in who["orgs"])

    def _create_repo(self, who: dict, body: dict) -> tuple[int, Any]:
        namespace = body.get("organization") or who["name"]
        repo_id = f"{namespace}/{body['name']}"
        if not self._writable(who, namespace):
            return 403, {"error": "You don't have the rights to create a model under this namespace"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = Repo(id=repo_id, private=body.get("visibility", "public") == "private" or bool(body.get("private")))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _preupload(self, repo: Repo, branch: str, body: dict) -> dict:
        existing = repo.branches.get(branch, {})
        return {
            "files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None}
                for f in body.get("files", [])
            ]
        }

    def _commit(self, repo: Repo, branch: str, raw: bytes) -> dict:
        files = dict(repo.branches.setdefault(branch, {}))
        summary = ""
        for line in raw.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value.get("summary", "")
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise ValueError(f"unsupported commit operation {item['key']}")
        digest = hashlib.sha1((repo.heads.get(branch, "") + json.dumps(sorted((k, git_blob_oid(v)) for k, v in files.items()))).encode())
        oid = digest.hexdigest()
        repo.branches[branch] = files
        repo.heads[branch] = oid
        repo.commits.append({"oid": oid, "branch": branch, "summary": summary, "files": sorted(files)})
        return {"commitUrl": f"{self.url}/{repo.id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _info(self, repo: Repo, branch: str) -> dict:
        return {
            "id": repo.id,
            "sha": repo.heads.get(branch),
            "private": repo.private,
            "tags": [],  # Transformers' model card reads the base model's tags
            "siblings": [{"rfilename": name} for name in sorted(repo.branches.get(branch, {}))],
        }

    def _resolve(self, who: dict | None, bad_token: bool, repo_id: str, revision: str, filename: str) -> tuple[int, dict, bytes]:
        """(status, headers, content) of a file download."""
        if bad_token:
            return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}, b""
        repo = self.repos.get(repo_id)
        name = who["name"] if who else None
        if repo is None or (repo.private and name != repo_id.split("/")[0]):
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if repo.gated and name not in repo.granted:
            message = "Access to this model is restricted. You must have access to it and be authenticated to access it."
            return (403 if who else 401), {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, b""
        revision = next((branch for branch, head in repo.heads.items() if head == revision), revision)  # a commit id: its branch
        if revision not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        commit = {"X-Repo-Commit": repo.heads[revision]}
        content = repo.branches[revision].get(filename)
        if content is None:
            return 404, {**commit, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, b""
        return 200, {**commit, "ETag": f'"{git_blob_oid(content)}"', "Content-Type": "application/octet-stream"}, content

    # ------------------------------------------------------------------- http
    def _handler(self):
        hub = self
        resolve_route = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
        repo_route = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>preupload|commit|revision|branch)/(?P<rev>.+))?$")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code >= 400:
                    self.send_header("X-Error-Message", str(body.get("error", "")) if isinstance(body, dict) else "")
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.bodies.append(raw)
                path = unquote(urlparse(self.path).path)
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                who = hub.tokens.get(token)
                resolve = resolve_route.match(path)
                if resolve:
                    with hub.lock:
                        hub.calls.append(("resolve", path))
                        injected = hub.fail.get("resolve")
                        if injected:
                            status, headers, content = injected.pop(0), {}, b""
                        else:
                            status, headers, content = hub._resolve(who, bool(token) and who is None, resolve["repo"], resolve["rev"], resolve["file"])
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    if method == "GET":
                        self.wfile.write(content)
                    return None
                match = repo_route.match(path)
                op = "whoami" if path == "/api/whoami-v2" else "create" if path == "/api/repos/create" else \
                    "validate" if path == "/api/validate-yaml" else (match["op"] or "info") if match else "unknown"
                with hub.lock:
                    hub.calls.append((op, path))
                    injected = hub.fail.get(op)
                    if injected:
                        return self._reply(injected.pop(0), {"error": f"injected failure on {op}"})
                    if who is None:
                        return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    if op == "whoami":
                        return self._reply(200, who)
                    if op == "create" and method == "POST":
                        return self._reply(*hub._create_repo(who, json.loads(raw)))
                    if op == "validate":
                        return self._reply(200, {"errors": [], "warnings": []})
                    if not match or match["repo"] not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    repo = hub.repos[match["repo"]]
                    if op in ("preupload", "commit", "branch") and not hub._writable(who, repo.id.split("/")[0]):
                        return self._reply(403, {"error": "forbidden"})
                    if op == "preupload":
                        return self._reply(200, hub._preupload(repo, match["rev"], json.loads(raw)))
                    if op == "commit":
                        return self._reply(200, hub._commit(repo, match["rev"], raw))
                    if op == "branch":
                        if match["rev"] in repo.branches:
                            return self._reply(409, {"error": "branch exists"})
                        repo.branches[match["rev"]] = dict(repo.branches["main"])
                        repo.heads[match["rev"]] = repo.heads["main"]
                        return self._reply(200, {})
                    return self._reply(200, hub._info(repo, match["rev"] if op == "revision" else "main"))

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_HEAD(self):
                self._route("HEAD")

        return Handler
