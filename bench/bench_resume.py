"""What a kill costs: a synthetic multi-GB checkpoint converted once uninterrupted, then once
killed (SIGKILL) after a given layer's checkpoint and resumed; prints the wall times, the time
lost to the kill, what the per-layer checkpoints cost, and the staging directory's extra size.

    python bench/bench_resume.py --workdir /tmp --kill-after 3

The checkpoint has bench_e2e's Mixtral layout at smaller shapes (default about 2.6 GB), so a
CPU run on a shared machine stays within minutes. Each run is a subprocess of the CLI.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_e2e import add_checkpoint_args, write_checkpoint

from hcconvert.cli.demo import data_file
from hcconvert.io.durable import KILL_AT_VARIABLE
from hcconvert.resources import human_bytes

CLI = [sys.executable, "-c", "from hcconvert.cli.main import main; main()"]


def timed_run(args: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """Wall and CPU seconds (user + system: what a shared machine's load does not inflate),
    exit code and stderr of one CLI run."""
    start, cpu = time.perf_counter(), children_cpu()
    process = subprocess.run([*CLI, *args], env={**os.environ, **(env or {})}, text=True,
                             capture_output=True)
    return (time.perf_counter() - start, children_cpu() - cpu, process.returncode,
            process.stderr)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def checkpoint_seconds(stderr: str) -> float:
    """The summary's "checkpoint" stage (saving the hidden states after each layer)."""
    match = re.search(r"checkpoint (\d+\.\d+)s", stderr)
    return float(match.group(1)) if match else 0.0


def largest_staging(root: Path) -> int:
    return max((sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                for d in root.glob(".out.hcconvert-tmp-*")), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_checkpoint_args(parser, layers=6, hidden=2048, ffn=4096, samples=8, seq_len=512)
    parser.add_argument("--kill-after", type=int, default=3, help="layer index")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        write_checkpoint(root / "src", args)
        source_bytes = sum(f.stat().st_size for f in (root / "src").iterdir())
        calib = root / "calib.txt"
        calib.write_text(data_file("demo_calib.txt").read_text()
                         * (1 + args.samples * args.seq_len // 40_000))
        convert = [str(root / "src"), "--experts", str(args.experts // 2), "--method", "merge",
                   "--calib", str(calib), "--calib-samples", str(args.samples),
                   "--seq-len", str(args.seq_len), "--max-shard-size", "1GB", "--out"]
        whole = timed_run([*convert, str(root / "whole" / "out")])
        assert whole[2] == 0, whole[3]
        killed = timed_run([*convert, str(root / "out")],
                           {KILL_AT_VARIABLE: f"commit:{args.kill_after}"})
        assert killed[2] == -9, killed[2]
        staged = largest_staging(root)
        resumed = timed_run([*convert, str(root / "out")])
        assert resumed[2] == 0, resumed[3]
    print(f"checkpoint: {args.layers} layers, {human_bytes(source_bytes)}; "
          f"{args.samples} x {args.seq_len} calibration tokens; CPU")
    print(f"saving hidden states in the uninterrupted run: {checkpoint_seconds(whole[3]):.1f}s")
    for unit, index in (("wall", 0), ("cpu", 1)):
        lost = killed[index] + resumed[index] - whole[index]
        print(f"{unit}: uninterrupted {whole[index]:.1f}s; killed after layer "
              f"{args.kill_after} {killed[index]:.1f}s + resumed {resumed[index]:.1f}s; "
              f"lost to the kill {lost:.1f}s ({100 * lost / whole[index]:.0f}% of a run)")
    print(f"staging at the kill: {human_bytes(staged)}")


if __name__ == "__main__":
    main()
