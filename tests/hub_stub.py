"""A stand-in for the Hugging Face Hub's upload API on 127.0.0.1, for tests (no network is used).

It answers the calls huggingface_hub 2.4 makes for ``create_repo`` + ``upload_folder`` and records
every request (method, path, headers, body) and every file committed:

- GET  /api/agent-harnesses                 best-effort telemetry registry (empty)
- POST /api/repos/create                    200 with the repo URL; 403 for namespace ``forbidden-org``;
                                            409 "already exists" for ``readonly-org``
- GET  /api/models/{repo}/revision/{rev}    403 (``create_repo(exist_ok=True)`` checks this after a 403)
- POST /api/validate-yaml                   400 unless the README front matter parses (yaml.safe_load)
- POST /api/models/{repo}/preupload/{rev}   every file "regular", so its bytes come inline (base64) in the
                                            commit instead of through LFS/xet; 403 for ``readonly-org``
- POST /api/models/{repo}/commit/{rev}      the ndjson commit: header line, then one line per file
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class HubStub:
    server: ThreadingHTTPServer
    requests: list[Request] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)  # {"repo", "summary", "files": {path: bytes}, "other": [...]}

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo: str) -> dict[str, bytes]:
        """Every file committed to ``repo`` (later commits overwrite earlier ones)."""
        merged: dict[str, bytes] = {}
        for commit in self.commits:
            if commit["repo"] == repo:
                merged.update(commit["files"])
        return merged

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(stub_ref: list[HubStub]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _reply(self, status: int, payload=None) -> None:
            body = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status >= 400 and isinstance(payload, dict) and "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _record(self) -> tuple[Request, HubStub]:
            stub = stub_ref[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Request(self.command, self.path, {key.lower(): value for key, value in self.headers.items()}, body)
            stub.requests.append(request)
            return request, stub

        def do_HEAD(self):
            self._record()
            self._reply(404, {"error": "Entry not found"})

        def do_GET(self):
            request, _ = self._record()
            path = request.path.split("?")[0]
            if path == "/api/agent-harnesses":
                return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
            if path.startswith("/api/models/") and "/revision/" in path:
                return self._reply(403, {"error": "Forbidden"})
            return self._reply(404, {"error": f"no route for GET {path}"})

        def do_POST(self):
            request, stub = self._record()
            path = request.path.split("?")[0]
            base = stub.endpoint
            if path == "/api/repos/create":
                payload = json.loads(request.body)
                repo = f"{payload.get('organization') or 'test-user'}/{payload['name']}"
                if repo.startswith("forbidden-org/"):
                    return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
                if repo.startswith("readonly-org/"):
                    return self._reply(409, {"error": "You already created this model repo", "url": f"{base}/{repo}"})
                return self._reply(200, {"url": f"{base}/{repo}", "name": repo, "id": "0" * 24})
            if path == "/api/validate-yaml":
                content = json.loads(request.body)["content"]
                try:
                    _, front_matter, _ = content.split("---\n", 2)
                    assert isinstance(yaml.safe_load(front_matter), dict)
                except (ValueError, AssertionError, yaml.YAMLError) as error:
                    return self._reply(400, {"errors": [{"message": f"bad metadata: {error}"}]})
                return self._reply(200, {"errors": [], "warnings": []})
            if path.startswith("/api/models/") and "/preupload/" in path:
                if path.startswith("/api/models/readonly-org/"):
                    return self._reply(403, {"error": "You don't have write access to this repo"})
                files = json.loads(request.body)["files"]
                return self._reply(200, {"files": [{"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                    "oid": None} for entry in files]})
            if path.startswith("/api/models/") and "/commit/" in path:
                repo = path.removeprefix("/api/models/").split("/commit/")[0]
                lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
                commit = {"repo": repo, "summary": lines[0]["value"]["summary"], "files": {}, "other": []}
                for line in lines[1:]:
                    if line["key"] == "file":
                        commit["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    else:  # lfsFile / deletedFile / ...: recorded so that a test can fail on them
                        commit["other"].append(line)
                stub.commits.append(commit)
                return self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                         "pullRequestUrl": None})
            return self._reply(404, {"error": f"no route for POST {path}"})

    return Handler


def start_hub_stub() -> HubStub:
    stub_ref: list[HubStub] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub_ref))
    stub = HubStub(server)
    stub_ref.append(stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return stub
