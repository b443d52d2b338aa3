"""Where an output is made before it is published: the checks on --out, a lock beside it, the
staging directory (a run's own, or for a resumable run the one named after its run key, with
its state.json), and the rename that publishes it; nothing else ever appears at --out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ResumableError, UserError
from ..resources import human_bytes
from ..signals import Interrupted, held_signals
from .durable import atomic_write, kill_point
from .files import SIDE_FILES
from .source import is_hub_id

STATE_FILE = "state.json"

OUTPUT_DIR = "output"

KEY_CHARS = 8  # of the run key's hex digest in the directory name; state.json holds it whole


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def describe_difference(found: dict, expected: dict) -> str:
    """What differs between a stale run key and this run's, in a few words."""
    if found.get("hcconvert") != expected["hcconvert"]:
        return f"hcconvert {found.get('hcconvert')} (this is {expected['hcconvert']})"
    if found.get("source") != expected["source"] or found.get("checkpoint") != \
            expected["checkpoint"]:
        return "another source, or the source has changed"
    theirs, ours = found.get("options") or {}, expected["options"]
    changed = sorted(name for name in ours if theirs.get(name) != ours[name])
    return "other options (" + ", ".join(changed) + ")" if changed else "other settings"


@dataclass
class RunState:
    """state.json: how far the run got. finished counts the layers done; writer_position the
    output tensors on disk (ShardWriter); layers the recorded LayerResults as dicts; hidden
    the file of the hidden states after the last finished layer (None when no layer follows)."""

    key: dict
    tokens_sha256: str
    finished: int = 0
    writer_position: int = 0
    layers: list[dict] = dataclasses.field(default_factory=list)
    hidden: str | None = None


def read_state(directory: Path) -> RunState | None:
    """The state a run left in its staging directory; None when there is none or it cannot be
    read (a run killed before its first layer finished)."""
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        return RunState(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_state(directory: Path, state: RunState) -> None:
    atomic_write(directory / STATE_FILE, json.dumps(dataclasses.asdict(state)).encode())


# What hcconvert puts beside --out: ".NAME" + tag (+ tempfile's random suffix on the first two,
# or on a resumable staging directory the run key's first KEY_CHARS hex digits).
STAGING_TAG = ".hcconvert-tmp-"

PREVIOUS_TAG = ".hcconvert-old-"

LOCK_TAG = ".hcconvert-lock"

TEMP_SUFFIX_CHARS = 8


def check_output_dir(out: Path, src: Path, overwrite: bool) -> None:
    """Refuse an --out that is a symbolic link, SRC, inside it or holding it, or the working
    directory or one above it (--overwrite replaces --out whole), or one that holds files
    (unless --overwrite); or where what goes beside it cannot be made."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; name the directory itself")
    out_abs, src_abs, cwd = out.resolve(), src.resolve(), Path.cwd().resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise UserError(f"--out {out} is the source directory or inside it")
    if out_abs in src_abs.parents:
        raise UserError(f"--out {out} contains the source directory")
    if out_abs == cwd or out_abs in cwd.parents:
        raise UserError(f"--out {out} is the working directory or holds it; name a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty (pass --overwrite to replace it)")
    # The staging directory and the lock are made beside --out, its missing parents first.
    home = next(path for path in out_abs.parents if path.exists())
    if not home.is_dir():
        raise UserError(f"--out {out}: {home} is not a directory")
    if not os.access(home, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {home} is not writable")
    check_name_length(out, home)


@contextmanager
def staged_outputs(outs: list[Path], src: Path, overwrite: bool, run_key: dict | None = None,
                   keep: bool = False, fresh: bool = False) -> Iterator[list[Path]]:
    """Staging directories for the outputs, each --out locked for the whole block.

    On a clean exit each staging directory replaces its --out; on any exception (a signal
    included) the staging directories, the locks and the parent directories this run created
    are removed, and every --out is left as it was. With a run_key (one output only) the
    staging directory is the run's own, found again by a later run with the same key
    (resume.py); with keep it stays when the block fails, for that later run, and with fresh
    a state found there is discarded first.
    """
    if run_key is not None and len(outs) != 1:
        raise ValueError("a resumable run has one output")
    with ExitStack() as stack:
        yield [stack.enter_context(StagedOutput(out, src, overwrite, run_key, keep, fresh))
               for out in outs]


class StagedOutput:
    """One --out: an exclusive lock beside it, a staging directory beside it (this run's own,
    or with a run key the one its interrupted runs used), published by rename on success (see
    staged_outputs)."""

    def __init__(self, out: Path, src: Path, overwrite: bool, run_key: dict | None = None,
                 keep: bool = False, fresh: bool = False):
        self.out = Path(os.path.abspath(out))  # "a/.." names its parent: no dot-dot names
        self.src = src.resolve()
        self.overwrite = overwrite
        self.run_key, self.keep, self.fresh = run_key, keep, fresh
        self.root: Path | None = None  # the staging directory: removed unless kept
        self.staging: Path | None = None  # what is published: root, or root/output
        self._created: list[Path] = []
        self._lock: OutputLock | None = None

    def __enter__(self) -> Path:
        check_output_dir(self.out, self.src, self.overwrite)
        try:
            self._created = make_parents(self.out.parent)
            self._lock = OutputLock(self.out)
            self._finish_interrupted_publish()
            check_output_dir(self.out, self.src, self.overwrite)  # again, now that it is ours
            if self.run_key is None:
                self.root = self.staging = Path(tempfile.mkdtemp(
                    prefix=hidden_name(self.out, STAGING_TAG), dir=self.out.parent))
            else:
                self.staging = self._open_resumable(self.out.parent / (
                    hidden_name(self.out, STAGING_TAG) + key_digest(self.run_key)[:KEY_CHARS]))
            self._report_stale()
        except BaseException:
            self._clean_up(published=False, kept=False)
            raise
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        published = kept = False
        with held_signals() as received:
            try:
                if exc_type is None:
                    self._publish()
                    published = True
            finally:
                kept = exc_type is not None and self.run_key is not None and (
                    self.keep or isinstance(exc, ResumableError))
                self._clean_up(published, kept)
        if isinstance(exc, Interrupted):
            exc.kept = self.root if kept else None
            exc.dropped = not kept and self.run_key is not None
        if kept and isinstance(exc, ResumableError):
            exc.args = (f"{exc}; the finished layers are kept: run the same command again to "
                        "go on",)
        if received and exc_type is None:
            raise Interrupted(received[0], published=True)

    def _open_resumable(self, root: Path) -> Path:
        """The run key's staging directory, made or found; emptied with fresh, or when the
        run that left it had published (killed before it removed its state). Found, it is
        kept if this run fails too: its finished layers are an earlier run's work."""
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise UserError(f"{root} is in the way (hcconvert stages there); remove it")
        self.root = root  # ours from here on: removed on failure unless kept
        if root.exists() and (self.fresh or not (root / OUTPUT_DIR).is_dir()):
            remove_tree(root, self.src)
        self.keep = self.keep or root.exists()
        (root / OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        return root / OUTPUT_DIR

    def _scratch(self, tag: str) -> list[Path]:
        """Directories a killed run left beside --out under this tag (SRC never counts)."""
        prefix = hidden_name(self.out, tag)
        return [path for path in self.out.parent.glob(glob.escape(prefix) + "*")
                if path.is_dir() and not path.is_symlink() and path != self.root
                and len(path.name) == len(prefix) + max(TEMP_SUFFIX_CHARS, KEY_CHARS)
                and not is_or_holds(path, self.src)]

    def _report_stale(self) -> None:
        """Staging directories of other runs on this --out (other options, another version,
        a killed private run): named with their size, never reused or deleted unasked."""
        for path in self._scratch(STAGING_TAG):
            state = read_state(path)
            what = ("nothing resumable" if state is None or self.run_key is None else
                    f"{state.finished} layers of a run with "
                    f"{describe_difference(state.key, self.run_key)}")
            print(f"warning: {path} was left by an interrupted run ({what}); it is not reused: "
                  f"delete it to free {human_bytes(tree_bytes(path))}", file=sys.stderr)

    def _finish_interrupted_publish(self) -> None:
        """A run killed while publishing may have moved the old --out aside: put it back when
        --out is missing (the new output is still staged), else it was replaced: remove it."""
        for previous in self._scratch(PREVIOUS_TAG):
            if self.out.exists():
                remove_tree(previous, self.src)
                continue
            os.replace(previous, self.out)
            print(f"warning: restored {self.out} from {previous.name}, where an interrupted run "
                  "had moved it while publishing", file=sys.stderr)

    def _publish(self) -> None:
        """Move staging into place. An old --out is moved aside first and deleted only once
        the new one is in place, so a crash never leaves neither."""
        if not self.out.exists():
            kill_point("publish")
            os.replace(self.staging, self.out)
            return
        previous = Path(tempfile.mkdtemp(prefix=hidden_name(self.out, PREVIOUS_TAG),
                                         dir=self.out.parent))
        os.replace(self.out, previous)  # onto the empty directory mkdtemp made
        kill_point("publish")
        try:
            os.replace(self.staging, self.out)
        except BaseException:
            os.replace(previous, self.out)
            raise
        remove_tree(previous, self.src)

    def _clean_up(self, published: bool, kept: bool) -> None:
        if self.root is not None and self.root.exists() and not kept:
            remove_tree(self.root, self.src)
        if self._lock is not None:
            self._lock.release()
        if not published and not kept:
            for directory in self._created:  # deepest first; one another run filled stays
                with contextlib.suppress(OSError):
                    directory.rmdir()


def check_results_file(option: str, path: Path, src: str) -> None:
    """A results file (compare's --csv and --json), checked before any work: never SRC's or
    inside it, and in a directory that exists."""
    if not is_hub_id(src) and is_or_holds(path, Path(src).resolve()):
        raise UserError(f"{option} {path} is inside the source directory")
    if not path.resolve().parent.is_dir():
        raise UserError(f"{option} {path}: {path.parent} is not a directory")


def is_or_holds(path: Path, src: Path) -> bool:
    target = path.resolve()
    return target == src or src in target.parents or target in src.parents


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def hidden_name(out: Path, tag: str) -> str:
    return f".{out.name}{tag}"


def check_name_length(out: Path, home: Path) -> None:
    """The names hcconvert puts beside --out (staging, old output, lock) must fit the name
    limit of the file system of home (--out's nearest existing parent), or the run would fail
    only once the work is done."""
    longest = max(len(os.fsencode(hidden_name(out, tag)))
                  for tag in (STAGING_TAG, PREVIOUS_TAG)) + max(TEMP_SUFFIX_CHARS, KEY_CHARS)
    try:
        limit = os.pathconf(home, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if longest > limit:
        raise UserError(f"--out name is too long: hcconvert writes {longest}-byte names beside "
                        f"it and the file system allows {limit}; use a shorter name")


def make_parents(directory: Path) -> list[Path]:
    """Create directory and its missing ancestors; return those created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
    return missing


def remove_tree(path: Path, src: Path) -> None:
    """rmtree, refusing any path that is SRC, inside it or holds it (whatever its name)."""
    if is_or_holds(path, src):
        raise UserError(f"refusing to remove {path}: it is or holds the source directory")
    shutil.rmtree(path.resolve())


class OutputLock:
    """An exclusive flock on a file beside --out, held for the whole run; the kernel drops it
    if the process dies, so a killed run never blocks the next one."""

    def __init__(self, out: Path):
        self.path = out.parent / hidden_name(out, LOCK_TAG)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"--out {out} is in use by another hcconvert run (it holds "
                                f"{self.path}); wait for it to finish or choose another "
                                "--out") from None
            if self._still_named(fd):
                self.fd = fd
                return
            os.close(fd)  # the last holder removed the file after we opened it: start over

    def _still_named(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        # Remove the name before unlocking, so a run waiting on this file starts over on a
        # new one (see _still_named) instead of sharing a lock nobody else can see.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


def copy_side_files(src: Path, dst: Path) -> None:
    """The tokenizer and generation files, and the remote code beside config.json (Kimi-K2's
    modeling and tokenizer modules and what they import), so the output loads as the source
    does; hcconvert never runs that code."""
    for name in (*SIDE_FILES, *sorted(path.name for path in src.glob("*.py"))):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
