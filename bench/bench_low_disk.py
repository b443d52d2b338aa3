"""Disk a Hub conversion needs: peak HF-cache and output bytes against the checkpoint's size,
with shards downloaded just in time, with --low-disk, and with --low-disk killed and resumed.

    python bench/bench_low_disk.py --workdir /tmp

A synthetic Mixtral-layout checkpoint (bench_e2e.write_checkpoint, default about 3.5 GB in
shards of about half a GB, as the Hub's repos shard by size) is served by the tests' fake Hub
on 127.0.0.1, and each run is a CLI subprocess with its own empty HF cache. A sampler thread
adds up the bytes allocated below the HF cache and below the run's directory (the output and
its staging directory) every 50 ms; the summary's "source disk peak" is hcconvert's own count.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_e2e import add_checkpoint_args, write_checkpoint

from hcconvert.cli.demo import data_file
from hcconvert.io.durable import KILL_AT_VARIABLE
from hcconvert.resources import human_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_hub import FakeHub  # noqa: E402  (a test helper, not part of the package)

CLI = [sys.executable, "-c", "from hcconvert.cli.main import main; main()"]
REPO = "bench/synthetic-moe"


def allocated(directory: Path) -> int:
    """Bytes on disk below directory (blocks allocated, so a file being written counts as far
    as it got); files that vanish while counted are skipped."""
    total = 0
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


class DiskSampler:
    """The peak of allocated() over some directories, each alone and all together."""

    def __init__(self, directories: dict[str, Path]):
        self.directories = directories
        self.peaks = dict.fromkeys([*directories, "total"], 0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.done.wait(0.05):
            sizes = {name: allocated(d) for name, d in self.directories.items()}
            sizes["total"] = sum(sizes.values())
            self.peaks = {name: max(self.peaks[name], sizes[name]) for name in self.peaks}

    def __enter__(self) -> DiskSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env={**os.environ, **env}, cwd=cwd, text=True,
                          capture_output=True)


def source_peak(stdout: str) -> str:
    match = re.search(r"source disk peak (\S+ \S+)", stdout)
    return match.group(1) if match else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_checkpoint_args(parser, layers=8, hidden=2048, ffn=4096, samples=8, seq_len=256)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--kill-after", type=int, default=3, help="layer index")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, FakeHub() as hub:
        root = Path(tmp)
        write_checkpoint(root / "src", args, args.shard_mb * 10**6)
        hub.state.repos[REPO] = root / "src"
        sizes = [p.stat().st_size for p in (root / "src").glob("*.safetensors")]
        calib = root / "calib.txt"
        calib.write_text(data_file("demo_calib.txt").read_text()
                         * (1 + args.samples * args.seq_len // 40_000))
        convert = [REPO, "--experts", str(args.experts // 2), "--method", "merge",
                   "--calib", str(calib), "--calib-samples", str(args.samples),
                   "--seq-len", str(args.seq_len), "--max-shard-size", f"{args.shard_mb}MB",
                   "--out", "out"]
        modes = {"just in time": [], "--low-disk": ["--low-disk"],
                 "--low-disk, killed and resumed": ["--low-disk"]}
        rows = []
        for mode, flags in modes.items():
            work, cache = root / "run", root / "hf-cache"
            work.mkdir()
            env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            start = time.perf_counter()
            with DiskSampler({"cache": cache, "output": work}) as sampler:
                if "killed" in mode:
                    killed = run_cli([*convert, *flags], {**env, KILL_AT_VARIABLE:
                                                          f"commit:{args.kill_after}"}, work)
                    assert killed.returncode == -9, killed.stderr[-2000:]
                result = run_cli([*convert, *flags], env, work)
            assert result.returncode == 0, result.stderr[-2000:]
            rows.append((mode, sampler.peaks, source_peak(result.stdout),
                         time.perf_counter() - start))
            shutil.rmtree(work)
            shutil.rmtree(cache, ignore_errors=True)
    size = sum(sizes)
    print(f"checkpoint: {args.layers} layers, {human_bytes(size)} in {len(sizes)} shards "
          f"(largest {human_bytes(max(sizes))}); "
          f"{args.experts} -> {args.experts // 2} experts; {time.strftime('%Y-%m-%d')}")
    print("| run | peak HF cache | of the checkpoint | hcconvert's count | peak output + staging "
          "| peak both | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, peaks, counted, seconds in rows:
        print(f"| {mode} | {human_bytes(peaks['cache'])} | {100 * peaks['cache'] / size:.0f} % "
              f"| {counted} | {human_bytes(peaks['output'])} | {human_bytes(peaks['total'])} "
              f"| {seconds:.0f} s |")


if __name__ == "__main__":
    main()
