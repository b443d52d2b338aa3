"""Against a fake Hub on 127.0.0.1: inspect and --dry-run read headers only, Hub failures and
--push-to-hub preflight are one line and exit 2 before any conversion work."""

import shutil
import socket
import struct
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import save_tiny_mixtral
from fake_hub import FakeHub, account
from test_cli import assert_user_error, run

import hcconvert.convert
from hcconvert import remote

REPO = "org/tiny-moe"
# An offline run used to spend 25 s in huggingface_hub's retries; a one-line failure is fast.
FAST_S = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("hub") / "src")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at a fresh fake Hub, with an empty cache and no token."""
    import huggingface_hub.constants as constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(variable, raising=False)
        yield fake


@pytest.fixture
def conversions(monkeypatch):
    """Every call of the conversion, which a preflight failure must come before."""
    calls = []
    monkeypatch.setattr(hcconvert.convert, "convert", lambda *args, **kw: calls.append(args))
    return calls


def assert_headers_only(hub, tiny, prefetch=remote.HEADER_PREFETCH):
    """Every shard was read by range, never whole: one request where its header fits in the
    prefetch, else a second for exactly the header; nothing landed in the HF cache."""
    shard_requests = hub.shard_requests()
    assert shard_requests
    for shard in tiny.glob("*.safetensors"):
        requests = [r for r in shard_requests if r.path.endswith("/" + shard.name)]
        header_end = 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
        expected = [min(prefetch, shard.stat().st_size)]
        if header_end > prefetch:
            expected.append(header_end)
        assert [r.bytes_sent for r in requests] == expected, shard.name
        assert all(r.method == "GET" and r.range for r in requests)
    # no repo listing or snapshot API: what snapshot_download would start with
    assert not [r for r in hub.state.requests if r.path.startswith("/api/models")]
    assert not list(Path(huggingface_hub.constants.HF_HUB_CACHE).rglob("*.safetensors"))


# The tiny shards' headers fit in 4096 bytes, and not in 64; the shards are ~30 KB.
@pytest.mark.parametrize("prefetch", [4096, 64])
def test_inspect_reads_only_headers(hub, tiny, monkeypatch, prefetch):
    monkeypatch.setattr(remote, "HEADER_PREFETCH", prefetch)
    hub.state.repos[REPO] = tiny
    result = run("inspect", REPO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == run("inspect", tiny).stdout
    assert "6 routed, top-2" in result.stdout
    assert_headers_only(hub, tiny, prefetch)


def test_dry_run_reads_only_headers(hub, tiny, calib_text, tmp_path):
    hub.state.repos[REPO] = tiny
    args = ("--experts", 3, "--dry-run", "--calib", calib_text, "--out", tmp_path / "out")
    result = run(REPO, *args)
    assert result.exit_code == 0, result.stderr
    local = run(tiny, *args).stdout
    without_source = [line for line in local.splitlines() if not line.startswith("source")]
    assert [line for line in result.stdout.splitlines()
            if not line.startswith("source")] == without_source
    assert f"source        {REPO}" in result.stdout
    assert_headers_only(hub, tiny)
    assert not (tmp_path / "out").exists()


def test_dry_run_of_a_hub_repo_without_tokenizer(hub, tiny, calib_text, tmp_path):
    repo = shutil.copytree(tiny, tmp_path / "repo")
    (repo / "tokenizer.json").unlink()
    hub.state.repos[REPO] = repo
    result = run(REPO, "--experts", 3, "--dry-run", "--calib", calib_text)
    assert_user_error(result, f"{REPO} has no tokenizer.json")
    assert "experts       6 -> 3" in result.stdout  # the plan is printed before the verdict


@pytest.mark.parametrize("status,fragment", [
    (None, "no such repo"),  # nothing served under REPO: 404 RepoNotFound
    (401, "rejected the token (401)"),
    (429, "rate limited"),
    (500, "500"),
])
def test_hub_errors_are_one_line(hub, status, fragment):
    hub.state.status = status
    for command in (("inspect", REPO), (REPO, "--experts", 3, "--dry-run", "--calib", "x")):
        assert_user_error(run(*command), fragment)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at a loopback port where nothing listens."""
    import huggingface_hub.constants as constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_unreachable_hub_is_one_fast_line(unreachable_hub, tiny, tmp_path, conversions):
    cases = [(("inspect", REPO), "offline"),
             ((REPO, "--experts", 3, "--out", tmp_path / "out"), "cannot download"),
             ((tiny, "--experts", 3, "--out", tmp_path / "out"), "pass --calib FILE")]
    for command, fragment in cases:
        start = time.monotonic()
        assert_user_error(run(*command), fragment)
        assert time.monotonic() - start < FAST_S
    assert not conversions and not (tmp_path / "out").exists()


@pytest.mark.parametrize("token,repo,who,fragment", [
    (None, "me/small", None, "needs a Hugging Face token"),
    ("bad", "me/small", None, "rejected the token (401)"),
    ("good", "me/bad..name", account("me"), "not a valid repo id"),
    ("good", "me/small", account("me", role="read"), "read-only"),
    ("good", "someone/small", account("me"), "me cannot write to 'someone'"),
    ("good", "club/small", account("me", orgs={"club": "read"}), "cannot write to 'club'"),
])
def test_push_preflight_fails_before_converting(hub, tiny, calib_text, tmp_path, monkeypatch,
                                                conversions, token, repo, who, fragment):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    if who:
        hub.state.accounts["good"] = who
    out = tmp_path / "out"
    for extra in ((), ("--dry-run",)):
        result = run(tiny, "--experts", 3, "--out", out, "--calib", calib_text,
                     "--push-to-hub", repo, *extra)
        assert_user_error(result, fragment)
    assert not conversions and not out.exists()


@pytest.mark.parametrize("repo,who", [("me/small", account("me")),
                                      ("small", account("me")),
                                      ("club/small", account("me", orgs={"club": "write"}))])
def test_push_preflight_passes_with_write_access(hub, tiny, calib_text, monkeypatch, repo, who):
    monkeypatch.setenv("HF_TOKEN", "good")
    hub.state.accounts["good"] = who
    result = run(tiny, "--experts", 3, "--dry-run", "--calib", calib_text, "--push-to-hub", repo)
    assert result.exit_code == 0, result.stderr
    assert any(r.path == "/api/whoami-v2" for r in hub.state.requests)


def test_push_while_offline(hub, tiny, calib_text, tmp_path, monkeypatch, conversions):
    monkeypatch.setenv("HF_TOKEN", "good")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = run(tiny, "--experts", 3, "--out", tmp_path / "out", "--calib", calib_text,
                 "--push-to-hub", "me/small")
    assert_user_error(result, "--push-to-hub me/small: offline (HF_HUB_OFFLINE is set")
    assert not conversions and not hub.state.requests
