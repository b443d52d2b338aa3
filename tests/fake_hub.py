"""A fake Hugging Face Hub on 127.0.0.1: serves checkpoint directories as repos and answers
/api/whoami-v2, recording every request, so tests see what hcconvert asked for.

It serves files (with HTTP ranges) under /{owner}/{name}/resolve/{revision}/{file} and
nothing else: a client that wanted the snapshot or tree APIs to download a repo gets 404.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    bytes_sent: int = 0


@dataclass
class HubState:
    repos: dict[str, Path] = field(default_factory=dict)  # repo id -> directory served
    accounts: dict[str, dict] = field(default_factory=dict)  # token -> whoami-v2 answer
    status: int | None = None  # when set, every /api and resolve request fails with it
    requests: list[Request] = field(default_factory=list)


class FakeHub:
    """Start with `with FakeHub() as hub:`; hub.url is the endpoint. The server thread stops
    when the block ends."""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def shard_requests(self) -> list[Request]:
        return [r for r in self.state.requests if r.path.endswith(".safetensors")]


class _Handler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        request = Request(self.command, self.path, self.headers.get("Range"))
        self.state.requests.append(request)
        if self.path == "/":
            return self._send(200, b"", body)
        if self.state.status is not None:
            return self._send(self.state.status, b"{}", body)
        if self.path == "/api/whoami-v2":
            return self._whoami(body)
        match = RESOLVE.match(self.path)
        if not match or match.group(1) not in self.state.repos:
            return self._send(404, b"", body, {"X-Error-Code": "RepoNotFound"})
        path = self.state.repos[match.group(1)] / match.group(3)
        if not path.is_file():
            return self._send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
        request.bytes_sent = self._send_file(path.read_bytes(), body)

    def _whoami(self, body: bool) -> None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        account = self.state.accounts.get(token)
        if account is None:
            return self._send(401, b'{"error": "Invalid credentials"}', body)
        self._send(200, json.dumps(account).encode(), body)

    def _send_file(self, data: bytes, body: bool) -> int:
        match = RANGE.match(self.headers.get("Range", ""))
        if not match:
            self._send(200, data, body)
            return len(data) if body else 0
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        part = data[start:end + 1]
        self._send(206, part, body, {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return len(part) if body else 0

    def _send(self, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def account(name: str, role: str = "write", orgs: dict[str, str] | None = None) -> dict:
    """A /api/whoami-v2 answer: a user, their token's role, their organizations' roles."""
    return {"type": "user", "name": name,
            "orgs": [{"name": org, "roleInOrg": r} for org, r in (orgs or {}).items()],
            "auth": {"type": "access_token", "accessToken": {"displayName": "t", "role": role}}}
