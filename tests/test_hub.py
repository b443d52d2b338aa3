"""Against a fake Hub on 127.0.0.1: inspect and --dry-run read headers only, Hub failures and
--push-to-hub preflight are one line and exit 2 before any conversion work, a conversion
downloads shards just in time and --low-disk deletes them once read."""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from checkpoints import load_all, save_tiny_mixtral, tree_digest
from cli_runs import CLI, assert_user_error, convert_args, run
from fake_hub import account, commit, fake_hub_session

import hcconvert.pipeline.convert
from hcconvert.io import remote, streaming
from hcconvert.io.durable import KILL_AT_VARIABLE
from hcconvert.pipeline import preflight
from hcconvert.pipeline.options import ConvertOptions

REPO = "org/tiny-moe"
# An offline run used to spend 25 s in huggingface_hub's retries; a one-line failure is fast.
FAST_S = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("hub") / "src")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at a fresh fake Hub, with an empty cache and no token."""
    yield from fake_hub_session(tmp_path, monkeypatch)


@pytest.fixture
def conversions(monkeypatch):
    """Every call of the conversion, which a preflight failure must come before."""
    calls = []
    monkeypatch.setattr(hcconvert.pipeline.convert, "convert",
                        lambda *args, **kw: calls.append(args))
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
    # A local directory downloads nothing, and its calibration is counted with its tokenizer.
    hub_only = ("source", "download", "calibration")
    assert [line for line in result.stdout.splitlines() if not line.startswith(hub_only)] \
        == [line for line in local.splitlines() if not line.startswith(hub_only)]
    assert f"source        {REPO}" in result.stdout
    assert re.search(r"download +\S+ KB of shards, at most \S+ KB in the HF cache at once with "
                     "--low-disk", result.stdout)
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


def cached_shards() -> set[str]:
    """The shards in the HF cache (a link whose blob was deleted does not count)."""
    return {p.name for p in Path(huggingface_hub.constants.HF_HUB_CACHE).rglob("*.safetensors")
            if p.exists()}


def layers_by_shard(src: Path) -> dict[str, set[int]]:
    """The decoder layers each shard holds tensors of; -1 for tensors outside the layers."""
    import json

    held: dict[str, set[int]] = {}
    for name, shard in json.loads((src / "model.safetensors.index.json").read_text())[
            "weight_map"].items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        held.setdefault(shard, set()).add(int(layer.group(1)) if layer else -1)
    return held


@pytest.fixture
def layer_reads(monkeypatch):
    """(layer, shards in the HF cache) as the read of each decoder layer begins."""
    reads = []
    read_layer = streaming.read_layer

    def recording(ckpt, prefix, pin):
        reads.append((int(prefix.split(".")[-2]), cached_shards()))
        return read_layer(ckpt, prefix, pin)
    monkeypatch.setattr(streaming, "read_layer", recording)
    return reads


def weights_digest(out: Path) -> dict[str, str]:
    """The output but its metadata and card, which name the source."""
    return {name: digest for name, digest in tree_digest(out).items()
            if name not in ("hcconvert.json", "README.md")}


@pytest.mark.parametrize("low_disk", [False, True])
def test_conversion_downloads_each_shard_just_in_time(hub, tiny, calib_text, tmp_path,
                                                      layer_reads, low_disk):
    hub.state.repos[REPO] = tiny
    flag = ("--low-disk",) if low_disk else ()
    result = run(*convert_args(REPO, tmp_path / "hub", calib_text, *flag))
    assert result.exit_code == 0, result.stderr
    layer_reads_of_the_hub_run = list(layer_reads)
    assert run(*convert_args(tiny, tmp_path / "local", calib_text)).exit_code == 0
    assert weights_digest(tmp_path / "hub") == weights_digest(tmp_path / "local")

    held = layers_by_shard(tiny)
    whole = [r.path for r in hub.shard_requests() if r.method == "GET" and not r.range]
    assert sorted(path.rsplit("/", 1)[1] for path in whole) == sorted(held)  # each once
    assert all(f"/resolve/{commit(REPO)}/" in path for path in whole)  # pinned, not "main"
    assert [layer for layer, _ in layer_reads_of_the_hub_run] == [0, 1]
    for layer, cached in layer_reads_of_the_hub_run:
        # nothing fetched before a layer that needs it; with --low-disk nothing kept after
        assert all(min(held[shard]) < layer for shard in cached), (layer, cached)
        if low_disk:
            assert all(max(held[shard]) >= layer for shard in cached), (layer, cached)
    assert cached_shards() == (set() if low_disk else set(held))
    peak = float(re.search(r"source disk peak (\S+) KB", result.stdout).group(1))
    shard_kb = sum(p.stat().st_size for p in tiny.glob("*.safetensors")) / 1000
    assert peak < shard_kb / 2 if low_disk else peak == pytest.approx(shard_kb, abs=0.1)
    ckpt, _, plan = preflight.plan_from_headers(REPO, ConvertOptions(experts=3))
    if low_disk:  # the preflight's bound holds
        assert peak <= preflight.download_bytes(ckpt, plan, low_disk=True) / 1000 + 0.05


def test_single_file_checkpoint_from_the_hub(hub, tiny, calib_text, tmp_path):
    from safetensors.torch import save_file

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, repo / name)
    save_file(load_all(tiny), repo / "model.safetensors")
    hub.state.repos[REPO] = repo
    result = run(*convert_args(REPO, tmp_path / "out", calib_text, "--low-disk"))
    assert result.exit_code == 0, result.stderr
    assert run(*convert_args(repo, tmp_path / "local", calib_text)).exit_code == 0
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "local")
    assert cached_shards() == set()


def test_shards_in_a_subfolder_convert_locally_and_from_the_hub(hub, tiny, calib_text,
                                                                  tmp_path):
    import json

    repo = shutil.copytree(tiny, tmp_path / "repo")
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    (repo / "weights").mkdir()
    for shard in set(index["weight_map"].values()):
        (repo / shard).rename(repo / "weights" / shard)
    index["weight_map"] = {name: "weights/" + shard for name, shard in index["weight_map"].items()}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.state.repos[REPO] = repo
    for source, out in ((repo, "local"), (REPO, "hub")):
        result = run(*convert_args(source, tmp_path / out, calib_text))
        assert result.exit_code == 0, result.stderr
    assert weights_digest(tmp_path / "hub") == weights_digest(tmp_path / "local")


def test_low_disk_resumes_a_killed_run_and_empties_the_cache(hub, tiny, calib_text, tmp_path):
    hub.state.repos[REPO] = tiny
    for place in ("reference", "resumed"):
        (tmp_path / place).mkdir()
    args = [str(a) for a in convert_args(REPO, "out", calib_text, "--low-disk")]
    assert run(*args[:4], str(tmp_path / "reference" / "out"), *args[5:]).exit_code == 0
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": huggingface_hub.constants.HF_HUB_CACHE, KILL_AT_VARIABLE: "commit:0"}
    killed = subprocess.run([*CLI, *args], cwd=tmp_path / "resumed", env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # What a kill can leave in the cache: a shard of the finished layer
    first_layer_only = [shard for shard, layers in layers_by_shard(tiny).items()
                        if layers == {0}]
    huggingface_hub.hf_hub_download(REPO, first_layer_only[0])
    del hub.state.requests[:]

    resumed = run(*args[:4], str(tmp_path / "resumed" / "out"), *args[5:])
    assert resumed.exit_code == 0 and "resuming: " in resumed.stderr, resumed.stderr
    assert tree_digest(tmp_path / "resumed" / "out") == tree_digest(tmp_path / "reference" / "out")
    downloads = {r.path.rsplit("/", 1)[1] for r in hub.shard_requests() if not r.range}
    assert downloads and not downloads & set(first_layer_only)  # layer 0 is not read again
    assert cached_shards() == set()


def test_a_download_failing_mid_run_keeps_the_finished_layers(hub, tiny, calib_text,
                                                               tmp_path):
    hub.state.repos[REPO] = tiny
    second_layer_only = [shard for shard, layers in layers_by_shard(tiny).items()
                         if layers == {1}]
    hub.state.broken.add(second_layer_only[0])
    args = convert_args(REPO, tmp_path / "out", calib_text, "--low-disk")
    failed = run(*args)
    assert failed.exit_code == 2  # one error line, after the progress bars of the work done
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hcconvert: error: cannot download {second_layer_only[0]}")
    assert last.endswith("the finished layers are kept: run the same command again to go on")
    assert list(tmp_path.glob(".out.hcconvert-tmp-*")) and not (tmp_path / "out").exists()

    hub.state.broken.clear()
    resumed = run(*args)
    assert resumed.exit_code == 0 and "resuming: " in resumed.stderr, resumed.stderr
    assert run(*convert_args(tiny, tmp_path / "local", calib_text)).exit_code == 0
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "local")


def make_link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def test_removing_a_cached_shard_spares_what_others_link_to(hub):
    """A blob two snapshots share (a shard unchanged between commits) stays until the last
    goes; a repo blob that links into the cache-wide store of Xet files takes nothing
    another repo still refers to."""
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    repo, other = cache / "models--org--tiny-moe", cache / "models--org--other"
    store = cache / "blobs" / "ab" / ("ab" + "0" * 62)
    store.parent.mkdir(parents=True)
    store.write_bytes(b"shared bytes")
    make_link(repo / "blobs" / "e1", store)
    make_link(other / "blobs" / "e1", store)
    make_link(other / "snapshots" / "c" / "m.safetensors", other / "blobs" / "e1")
    first, second = (repo / "snapshots" / c / "m.safetensors" for c in ("a", "b"))
    for link in (first, second):
        make_link(link, repo / "blobs" / "e1")

    remote.remove_cached(first)
    assert not first.is_symlink() and second.read_bytes() == b"shared bytes"
    remote.remove_cached(second)
    assert not second.is_symlink() and not (repo / "blobs" / "e1").is_symlink()
    assert (other / "snapshots" / "c" / "m.safetensors").read_bytes() == b"shared bytes"


def test_low_disk_refuses_a_local_directory(tiny, calib_text, tmp_path):
    before = tree_digest(tiny)
    for extra in ((), ("--dry-run",)):
        result = run(*convert_args(tiny, tmp_path / "out", calib_text, "--low-disk", *extra))
        assert_user_error(result, "is a local directory, which hcconvert never modifies")
    assert not (tmp_path / "out").exists() and tree_digest(tiny) == before


def test_low_disk_needs_only_the_shards_in_flight(hub, tiny, calib_text, tmp_path,
                                                   monkeypatch):
    """Free disk between what --low-disk needs and the whole checkpoint: the preflight
    passes with --low-disk only."""
    hub.state.repos[REPO] = tiny
    options = ConvertOptions(experts=3, calib=str(calib_text))
    ckpt, _, plan = preflight.plan_from_headers(REPO, options)
    low = plan.bytes_out + preflight.download_bytes(ckpt, plan, low_disk=True)
    whole = plan.bytes_out + preflight.download_bytes(ckpt, plan, low_disk=False)
    assert low < whole and whole - plan.bytes_out > plan.bytes_in  # files: headers too
    free = shutil.disk_usage(tmp_path)._replace(free=(low + whole) // 2)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: free)
    args = (REPO, "--experts", 3, "--calib", calib_text, "--out", tmp_path / "out", "--dry-run")
    assert_user_error(run(*args), "not enough disk")
    result = run(*args, "--low-disk")
    assert result.exit_code == 0, result.stderr
    assert "(--low-disk)" in result.stdout
