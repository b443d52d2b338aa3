"""Peak host memory and wall time of a conversion as depth grows (make bench).

Builds synthetic Mixtral-shaped checkpoints of 4, 16 and 32 layers (random bf16 weights, same
layer shape), converts each in a fresh process, and prints peak RSS and wall time next to the
time it takes to copy the same bytes. Streaming means peak RSS stays flat as depth grows.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hcconvert.cli.demo import DemoShape, build_planted_mixtral, data_file

CONVERT_IN_CHILD = """
import json, sys
from pathlib import Path
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions
from hcconvert.resources import peak_rss_bytes
options = ConvertOptions(experts=4, calib=sys.argv[3], calib_samples=8, seq_len=256,
                         device="cpu", max_shard_size=200_000_000, method="hc-smoe")
conversion = convert(sys.argv[1], Path(sys.argv[2]), options, progress=False)
print(json.dumps({"peak_rss": peak_rss_bytes(), "wall": conversion.timer.wall,
                  "stages": conversion.timer.seconds}))
"""


def convert_in_child(src: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CONVERT_IN_CHILD, str(src), str(out),
                             str(data_file("demo_calib.txt"))], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def copy_seconds(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048)
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, python {platform.python_version()}")
    print(f"layer shape: hidden {args.hidden}, ffn {args.ffn}, 8 experts -> 4, bf16, "
          "8 x 256 calibration tokens, CPU\n")
    print("| layers | checkpoint | peak RSS | wall | read / forward / write | copy same bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    peaks = []
    for depth in args.depths:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            build_planted_mixtral(src, DemoShape(layers=depth, hidden=args.hidden,
                                                 ffn=args.ffn, heads=8, kv_heads=2))
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            copy = copy_seconds(src, Path(tmp) / "copy")
            run = convert_in_child(src, Path(tmp) / "out")
            stages = " / ".join(f"{run['stages'].get(k, 0):.1f}s"
                                for k in ("read", "forward", "write"))
            peaks.append(run["peak_rss"])
            print(f"| {depth} | {size / 1e6:.0f} MB | {run['peak_rss'] / 1e6:.0f} MB | "
                  f"{run['wall']:.1f}s | {stages} | {copy:.1f}s |", flush=True)
    spread = (max(peaks) - min(peaks)) / min(peaks)
    print(f"\npeak RSS spread across depths: {spread:.1%} (target: within 15%)")


if __name__ == "__main__":
    main()
