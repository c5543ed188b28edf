"""A loopback fake of the Hugging Face Hub: the endpoints huggingface_hub 2.x calls to create a repo,
commit files to it (every file "regular": base64 inside the NDJSON commit, no LFS/Xet) and download
them again (repo info, tree, resolve). Everything it receives stays in memory.

    hub = FakeHub().start()           # http://127.0.0.1:<port>, a daemon thread
    hub.files("me/tiny")              # {path: bytes} on main
    hub.fail = (401, "")              # answer 401 to every request whose path contains ""
    hub.stop()

Error answers echo the request's Authorization header, as a careless server might: a client that
prints the server's message must scrub the token from it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision|tree|branch)/([^/]+)(/.*)?)?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class FakeHub:
    def __init__(self):
        self.branches: dict[str, dict[str, str]] = {}     # repo -> {branch: commit sha}
        self.commits: dict[str, dict[str, bytes]] = {}    # commit sha -> {path: bytes}
        self.requests: list[tuple[str, str]] = []         # (method, path) of every request
        self.authorizations: set[str] = set()             # the Authorization headers it saw
        self.created: dict[str, dict] = {}                # repo -> the create_repo payload
        self.fail: tuple[int, str] | None = None          # (status, path substring) to answer with an error
        self.lock = threading.Lock()

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return self.commits[self.branches[repo][revision]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str, branch: str, files: dict[str, bytes], title: str) -> str:
        sha = hashlib.sha1(f"{self.branches[repo].get(branch)}{title}{sorted(files)}".encode()
                           + b"".join(files[k] for k in sorted(files))).hexdigest()
        self.commits[sha] = files
        self.branches[repo][branch] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

    def log_message(self, *args):  # quiet
        pass

    # --- plumbing

    def _send(self, status: int, body=b"", headers=None, head=False):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None = None, head=False):
        said = f"refused ({self.headers.get('Authorization', 'no token')})"  # echoes the token, on purpose
        self._send(status, {"error": said}, {"X-Error-Code": code} if code else None, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _route(self, method: str):
        hub, path = self.hub, unquote(urlsplit(self.path).path)
        body = self._body() if method == "POST" else b""
        with hub.lock:
            hub.requests.append((method, path))
            if self.headers.get("Authorization"):
                hub.authorizations.add(self.headers["Authorization"])
            if hub.fail is not None and hub.fail[1] in path:
                status = hub.fail[0]
                return self._error(status, "RepoNotFound" if status == 404 else None, head=method == "HEAD")
            if path == "/api/whoami-v2":
                return self._send(200, {"type": "user", "name": "me", "orgs": [],
                                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if path == "/api/repos/create" and method == "POST":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(json.loads(body)["content"])
            if (m := API.match(path)) is not None:
                return self._api(method, m.group(1), m.group(2), m.group(3), body)
            if (m := RESOLVE.match(path)) is not None and method in ("GET", "HEAD"):
                return self._resolve(m.group(1), m.group(2), m.group(3), head=method == "HEAD")
            return self._error(404)

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    # --- endpoints

    def _create(self, payload: dict):
        repo = f"{payload['organization']}/{payload['name']}"
        if repo in self.hub.branches:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo}"})
        self.hub.created[repo] = payload
        self.hub.branches[repo] = {}
        self.hub.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                        "initial commit")
        return self._send(200, {"url": f"{self.hub.url}/{repo}", "name": repo})

    def _validate_yaml(self, content: str):
        try:
            front = content.split("---\n", 2)[1] if content.startswith("---\n") else ""
            if not isinstance(yaml.safe_load(front) or {}, dict):
                raise ValueError("the metadata is not a mapping")
        except (ValueError, IndexError, yaml.YAMLError) as e:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        return self._send(200, {"errors": [], "warnings": []})

    def _revision(self, repo: str, revision: str) -> str | None:
        if revision in self.hub.branches[repo]:
            return self.hub.branches[repo][revision]
        return revision if revision in self.hub.commits else None

    def _api(self, method: str, repo: str, op: str | None, revision: str | None, body: bytes):
        if repo not in self.hub.branches:
            return self._error(404, "RepoNotFound")
        if op == "branch" and method == "POST":
            if revision in self.hub.branches[repo]:
                return self._send(409, {"error": "Branch already exists"})
            start = (json.loads(body or b"{}").get("startingPoint")) or "main"
            self.hub.branches[repo][revision] = self._revision(repo, start)
            return self._send(200, {})
        sha = self._revision(repo, revision or "main")
        if sha is None:
            return self._error(404, "RevisionNotFound")
        if op == "preupload" and method == "POST":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if op == "commit" and method == "POST":
            return self._commit(repo, revision, body)
        files = self.hub.commits[sha]
        if op == "tree" and method == "GET":
            return self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": _sha(d)}
                                    for p, d in sorted(files.items())])
        if op in (None, "revision") and method == "GET":
            return self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": False,
                                    "siblings": [{"rfilename": p} for p in sorted(files)]})
        return self._error(404)

    def _commit(self, repo: str, branch: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = dict(self.hub.commits[self.hub.branches[repo][branch]])
        title = ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                title = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile: this fake always answers "regular", so the client never sends one
                return self._send(400, {"error": f"unsupported commit line {key}"})
        sha = self.hub.commit(repo, branch, files, title)
        return self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    def _resolve(self, repo: str, revision: str, path: str, head: bool):
        if repo not in self.hub.branches:
            return self._error(404, "RepoNotFound", head)
        sha = self._revision(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", head)
        data = self.hub.commits[sha].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", head)
        self._send(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{_sha(data)}"',
                               "X-Repo-Commit": sha}, head)
