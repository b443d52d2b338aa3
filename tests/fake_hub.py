"""A fake Hugging Face Hub on 127.0.0.1: serves checkpoint directories as repos and answers
/api/whoami-v2, recording every request, so tests see what hcconvert asked for.

It serves files (with HTTP ranges, and the commit and ETag headers hf_hub_download needs)
under /{owner}/{name}/resolve/{revision}/{file}, and the two API calls snapshot_download
starts with: a repo's commit (/api/models/{repo}/revision/{revision}) and its file tree
(/api/models/{repo}/tree/{commit}). Every revision names the one commit a model repo has.

Dataset repos have commits and branches (add_dataset pushes a directory as a new commit):
their files under /datasets/{owner}/{name}/resolve/{revision}/{file}, and dataset_info's
/api/datasets/{repo}[/revision/{revision}] with the commit, the files and the card's YAML
(the front matter of the commit's README.md, as the Hub parses it into cardData).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
MODEL_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)")
DATASET_RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)")
DATASET_API = re.compile(r"^/api/datasets/([^/]+/[^/?]+)(?:/revision/([^/?]+))?(?:\?.*)?$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    bytes_sent: int = 0


@dataclass
class DatasetRepo:
    commits: dict[str, Path] = field(default_factory=dict)  # commit -> directory served
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit

    def commit_of(self, revision: str) -> str | None:
        revision = unquote(revision)
        return revision if revision in self.commits else self.refs.get(revision)


@dataclass
class HubState:
    repos: dict[str, Path] = field(default_factory=dict)  # repo id -> directory served
    datasets: dict[str, DatasetRepo] = field(default_factory=dict)
    accounts: dict[str, dict] = field(default_factory=dict)  # token -> whoami-v2 answer
    status: int | None = None  # when set, every /api and resolve request fails with it
    broken: set[str] = field(default_factory=set)  # files whose download (no Range) gets 403
    requests: list[Request] = field(default_factory=list)


def fake_hub_session(tmp_path: Path, monkeypatch) -> Iterator[FakeHub]:
    """huggingface_hub pointed at a fresh fake Hub, with empty caches (files and assets) and
    no token, for a pytest fixture to yield from."""
    import huggingface_hub.constants as constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        # hf_hub_download builds its URLs from this, fixed when huggingface_hub is imported
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            fake.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "hf-assets"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(variable, raising=False)
        yield fake


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

    def add_dataset(self, repo_id: str, directory: Path, branch: str = "main") -> str:
        """Push directory as a new commit of the dataset repo onto branch; its commit."""
        repo = self.state.datasets.setdefault(repo_id, DatasetRepo())
        sha = hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = directory
        repo.refs[branch] = sha
        return sha

    def downloads(self) -> list[str]:
        """The dataset files fetched whole (GET without a range), in order."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.state.requests
                if r.method == "GET" and not r.range and DATASET_RESOLVE.match(r.path)]


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
        dataset = DATASET_RESOLVE.match(self.path) or DATASET_API.match(self.path)
        if dataset:
            return self._dataset(dataset, request, body)
        match = RESOLVE.match(self.path) or MODEL_API.match(self.path)
        if not match or match.group(1) not in self.state.repos:
            return self._send(404, b"", body, {"X-Error-Code": "RepoNotFound"})
        repo_id, root = match.group(1), self.state.repos[match.group(1)]
        if match.re is MODEL_API:
            return self._model_api(repo_id, root, match.group(2), body)
        path = root / match.group(3)
        if match.group(3) in self.state.broken and not self.headers.get("Range"):
            return self._send(403, b"{}", body)
        if not path.is_file():
            return self._send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
        request.bytes_sent = self._send_file(path, body, {"X-Repo-Commit": commit(repo_id),
                                                          "ETag": f'"{etag(path)}"'})

    def _model_api(self, repo_id: str, root: Path, call: str, body: bool) -> None:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        names = [str(p.relative_to(root)) for p in files]
        if call == "revision":
            answer: object = {"id": repo_id, "sha": commit(repo_id),
                              "siblings": [{"rfilename": name} for name in names]}
        else:
            answer = [{"type": "file", "path": name, "size": p.stat().st_size, "oid": etag(p)}
                      for name, p in zip(names, files, strict=True)]
        self._send(200, json.dumps(answer).encode(), body)

    def _dataset(self, match: re.Match, request: Request, body: bool) -> None:
        repo = self.state.datasets.get(match.group(1))
        if repo is None:
            return self._send(404, b"{}", body, {"X-Error-Code": "RepoNotFound"})
        sha = repo.commit_of(match.group(2) or "main")
        if sha is None:
            return self._send(404, b"{}", body, {"X-Error-Code": "RevisionNotFound"})
        root = repo.commits[sha]
        if match.re is DATASET_API:
            names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            answer = {"id": match.group(1), "sha": sha,
                      "siblings": [{"rfilename": name} for name in names],
                      **({"cardData": card} if (card := card_data(root)) else {})}
            return self._send(200, json.dumps(answer).encode(), body)
        path = root / unquote(match.group(3))
        if not path.is_file():
            return self._send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
        request.bytes_sent = self._send_file(path, body, {"X-Repo-Commit": sha,
                                                          "ETag": f'"{etag(path)}"'})

    def _whoami(self, body: bool) -> None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        account = self.state.accounts.get(token)
        if account is None:
            return self._send(401, b'{"error": "Invalid credentials"}', body)
        self._send(200, json.dumps(account).encode(), body)

    def _send_file(self, path: Path, body: bool, headers: dict) -> int:
        """The file, or the asked range of it, streamed from disk (shards may be GBs)."""
        size = path.stat().st_size
        match = RANGE.match(self.headers.get("Range", ""))
        start, end = 0, size - 1
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        self._send(206 if match else 200, None, body, headers, end + 1 - start)
        if not body:
            return 0
        with open(path, "rb") as f:
            f.seek(start)
            try:
                shutil.copyfileobj(_Limited(f, end + 1 - start), self.wfile)
            except (BrokenPipeError, ConnectionResetError):  # the client had enough
                pass
        return end + 1 - start

    def _send(self, status: int, data: bytes | None, body: bool, headers: dict | None = None,
              length: int | None = None) -> None:
        """The status line and headers, then data unless the caller streams length bytes."""
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if data is not None else length))
        self.end_headers()
        if body and data is not None:
            self.wfile.write(data)


class _Limited:
    """The next `left` bytes of a file, for shutil.copyfileobj."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def card_data(root: Path) -> dict | None:
    """The YAML front matter of a dataset's README.md, as the Hub returns it (cardData)."""
    import yaml

    readme = root / "README.md"
    if not readme.is_file():
        return None
    parts = readme.read_text().split("---\n")
    return yaml.safe_load(parts[1]) if len(parts) > 2 and parts[0] == "" else None


def commit(repo_id: str) -> str:
    """The one commit of a repo: 40 hex digits, as the Hub names commits."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def etag(path: Path) -> str:
    """A stand-in for the file's blob id, cheap for GB files: its name, size and mtime."""
    stat = path.stat()
    return hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def account(name: str, role: str = "write", orgs: dict[str, str] | None = None) -> dict:
    """A /api/whoami-v2 answer: a user, their token's role, their organizations' roles."""
    return {"type": "user", "name": name,
            "orgs": [{"name": org, "roleInOrg": r} for org, r in (orgs or {}).items()],
            "auth": {"type": "access_token", "accessToken": {"displayName": "t", "role": role}}}
