"""A Hub checkpoint read over HTTP: its config, index and safetensors headers without its
weights (RemoteFiles), and its shards downloaded just in time for a conversion (HubFiles).

A safetensors shard starts with an 8-byte header length and the JSON header; an HTTP range
request fetches just those, so planning a 93 GB checkpoint moves a few hundred kilobytes.
RemoteFiles leaves errors to the caller's hub.hub_errors.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from ..errors import ResumableError, UserError
from .files import HUB_SIDE_FILES, LocalFiles
from .headers import header_tensors
from .tensors import TensorInfo

# Bytes asked for first: most headers fit (huggingface_hub's own reader asks for as much), so
# one request per shard is the rule and a second, exact one the exception.
HEADER_PREFETCH = 100_000
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
PARALLEL_REQUESTS = 8  # DeepSeek-V3 has 163 shards: one after another that is many seconds
TIMEOUT_S = 10.0


class RemoteFiles:
    """A Hub repo's files at a revision: small files in one GET each, shard headers by range."""

    root = None  # no local directory: the shards are not here

    def __init__(self, repo_id: str, revision: str | None = None, repo_type: str = "model"):
        from huggingface_hub.utils import build_hf_headers

        self.repo_id, self.revision = repo_id, revision
        # A dataset's files resolve under /datasets/ (hf_hub_url's rule)
        self.url_prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self.location = repo_id if revision is None else f"{repo_id}@{revision}"
        self.headers = build_hf_headers()  # the token from the usual HF environment, if any
        self.sizes: dict[str, int] = {}  # shard -> file bytes, where the server said

    def url(self, name: str) -> str:
        """The file's resolve URL, as hf_hub_url builds it, on the endpoint configured now."""
        from huggingface_hub import constants

        revision = quote(self.revision or constants.DEFAULT_REVISION, safe="")
        return (f"{constants.ENDPOINT}/{self.url_prefix}{self.repo_id}/resolve/{revision}/"
                f"{quote(name)}")

    def read_text(self, name: str) -> str | None:
        from huggingface_hub.utils import get_session

        response = get_session().get(self.url(name), headers=self.headers, timeout=TIMEOUT_S)
        return None if _raise_unless_missing(response) else response.text

    def exists(self, name: str) -> bool:
        from huggingface_hub.utils import get_session

        response = get_session().head(self.url(name), headers=self.headers, timeout=TIMEOUT_S)
        return not _raise_unless_missing(response)

    def track(self, tensors: dict[str, TensorInfo]) -> None:
        """Nothing to count: no shard of a RemoteFiles is ever downloaded."""

    def shard_headers(self, shards: list[str]) -> dict[str, TensorInfo]:
        with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
            parts = list(pool.map(self.shard_header, shards))
        return {name: info for part in parts for name, info in part.items()}

    def shard_header(self, shard: str) -> dict[str, TensorInfo]:
        data, size = self.read_prefix(shard, HEADER_PREFETCH)
        if len(data) < 8:
            raise UserError(f"shard {shard} of {self.location} is too short for safetensors")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > MAX_HEADER_BYTES:
            raise UserError(f"shard {shard} of {self.location} has an implausible header "
                            f"length {header_len}")
        if len(data) < 8 + header_len:
            data, size = self.read_prefix(shard, 8 + header_len)
        try:
            header = json.loads(data[8:8 + header_len])
        except ValueError as err:
            raise UserError(f"shard {shard} of {self.location} has an unreadable header "
                            f"({err})") from None
        if size is not None:
            self.sizes[shard] = size
        return header_tensors(shard, header, header_len, size)

    def read_prefix(self, name: str, length: int) -> tuple[bytes, int | None]:
        """The first length bytes of a shard (fewer if it is shorter) and its size (None when
        the server does not say)."""
        found = self.read_range(name, 0, length)
        if found is None:
            raise UserError(f"shard {name} named in the index is missing from {self.location}")
        return found

    def read_range(self, name: str, start: int, length: int) -> tuple[bytes, int | None] | None:
        """length bytes of a file from start (fewer where it ends sooner) and its size (None
        when the server does not say); None when the repo has no such file. Streamed, so a
        server that ignores the range (200, the whole file) is read no further than needed."""
        from huggingface_hub.utils import get_session

        headers = {**self.headers, "Range": f"bytes={start}-{start + length - 1}"}
        with get_session().stream("GET", self.url(name), headers=headers,
                                  timeout=TIMEOUT_S) as response:
            if _raise_unless_missing(response, stream=True):
                return None
            skip = start if response.status_code == 200 else 0
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= skip + length:
                    break
            return bytes(data[skip:skip + length]), _file_size(response.headers)


def _raise_unless_missing(response, stream: bool = False) -> bool:
    """True for a file the repo does not have; raise the Hub's error for any other failure
    (no such repo or revision, 401, 429...)."""
    from huggingface_hub.utils import hf_raise_for_status

    if response.status_code == 404 and response.headers.get("X-Error-Code") in (None,
                                                                              "EntryNotFound"):
        return True
    if response.status_code >= 400:
        if stream:
            response.read()  # the error body, for hf_raise_for_status's message
        hf_raise_for_status(response)
    return False


def _file_size(headers) -> int | None:
    """The whole file's size: after the slash of Content-Range (206), else Content-Length."""
    content_range = headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = headers.get("Content-Length")
    return int(length) if length and not content_range else None


class HubFiles(LocalFiles):
    """A Hub repo's snapshot in the HF cache that starts with its small files only: the shard
    headers are read remotely, and each shard is downloaded when the run first reads a tensor
    in it (on the prefetch thread, a layer ahead of the computation). With low_disk a shard
    leaves the cache once the run has released every tensor in it (also one cached before
    the run: --low-disk treats the cache's copy of SRC as disposable), so the cache holds
    little more than the shards of the layers in flight. One thread at a time uses it: the
    main thread until the prefetch thread starts, then that one."""

    def __init__(self, repo_id: str, root: Path, low_disk: bool):
        super().__init__(root)
        # The snapshot directory is named by its commit: every shard from that same commit.
        self.remote = RemoteFiles(repo_id, root.name)
        self.location = repo_id
        self.low_disk = low_disk
        self.shard_of: dict[str, str] = {}  # tensor -> its shard
        self.unreleased: dict[str, set[str]] = {}  # shard -> its tensors the run may still read
        self.downloaded: dict[str, int] = {}  # shard -> bytes, downloaded by this run, still here
        self.peak_bytes = 0  # the most of self.downloaded held at once

    @classmethod
    def download_side_files(cls, repo_id: str, revision: str | None,
                            low_disk: bool) -> HubFiles:
        """The repo's config, index, tokenizer and card downloaded into the HF cache now."""
        from huggingface_hub import snapshot_download

        from .hub import hub_errors

        with hub_errors(f"cannot download {repo_id!r}"):
            root = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_SIDE_FILES)
        return cls(repo_id, Path(root), low_disk)

    def shard_headers(self, shards: list[str]) -> dict[str, TensorInfo]:
        from .hub import hub_errors

        with hub_errors(f"cannot read {self.location!r} from the Hub"):
            return self.remote.shard_headers(shards)

    def exists(self, name: str) -> bool:
        from .hub import hub_errors

        with hub_errors(f"cannot read {self.location!r} from the Hub"):
            return super().exists(name) or self.remote.exists(name)  # a shard not here yet

    def track(self, tensors: dict[str, TensorInfo]) -> None:
        self.shard_of = {name: info.shard for name, info in tensors.items()}
        for name, info in tensors.items():
            self.unreleased.setdefault(info.shard, set()).add(name)

    def local_shard(self, shard: str) -> Path:
        path = self.root / shard
        if path.exists():
            return path
        from huggingface_hub import hf_hub_download

        from .hub import hub_errors

        try:
            with hub_errors(f"cannot download {shard} of {self.location}"):
                path = Path(hf_hub_download(self.remote.repo_id, shard,
                                            revision=self.remote.revision))
        except UserError as err:  # mid-run: the finished layers are worth keeping
            raise ResumableError(str(err)) from None
        self.downloaded[shard] = path.stat().st_size
        self.peak_bytes = max(self.peak_bytes, sum(self.downloaded.values()))
        return path

    def release(self, names: list[str]) -> None:
        shards = {self.shard_of[name] for name in names}
        for name in names:
            self.unreleased[self.shard_of[name]].discard(name)
        for shard in shards:
            if self.low_disk and not self.unreleased[shard]:
                remove_cached(self.root / shard)
                self.downloaded.pop(shard, None)


def remove_cached(path: Path) -> None:
    """A snapshot's file out of the HF cache, with huggingface_hub's own deletion: the link,
    and the repo's blob it points to unless another snapshot of the repo links to it too (a
    shard unchanged between two commits); a blob that is a link into the cache-wide store
    of Xet files takes that copy with it only when no other repo refers to it."""
    from huggingface_hub import DeleteCacheStrategy, constants

    if not path.is_symlink():
        path.unlink(missing_ok=True)  # a cache without links holds copies
        return
    blob = _first_hop(path)
    snapshots = path.parents[1]  # the repo's snapshots/; path is snapshots/<commit>/<file>
    shared = any(other != path and other.is_symlink() and _first_hop(other) == blob
                 for other in snapshots.glob("*/**/*"))
    DeleteCacheStrategy(expected_freed_size=0, blobs=frozenset() if shared else frozenset({blob}),
                        refs=frozenset(), repos=frozenset(), snapshots=frozenset(),
                        files=frozenset({path}), cache_dir=Path(constants.HF_HUB_CACHE)).execute()


def _first_hop(link: Path) -> Path:
    """Where a link points, one step only (the repo's blob, not what that blob links to)."""
    return Path(os.path.normpath(link.parent / os.readlink(link)))
