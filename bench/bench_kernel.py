"""Benchmark the fused expert activation-sum kernel (needs a CUDA GPU).

Compares, per MoE layer shape:

* ``fused``   -- hcconvert.kernels.expert_sums.expert_act_sums (Triton, no [T, F] tensor)
* ``unfused`` -- expert_act_sums_torch with a large token chunk: two cuBLAS GEMMs per expert,
  silu * mul and a token sum in torch
* ``gemm``    -- a bare bf16 GEMM with the same FLOPs, x @ cat(w_gate, w_up)[e].T per expert
  (an upper bound for any implementation built on the same GEMMs)

and prints a markdown table with ms, TFLOP/s, speedup vs unfused and fraction of the bare GEMM
throughput. Also checks that the kernel agrees with the torch twin.

    python bench/bench_kernel.py            # T = 65536 tokens
    python bench/bench_kernel.py --quick    # T = 8192 tokens
"""

from __future__ import annotations

import argparse
import sys

import torch

# (name, H, F, E): one MoE layer of each model.
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60),
}


def _time_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` in ms, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_model(name, H, F, E, T, dtype, warmup, reps, unfused_chunk, device="cuda"):
    from hcconvert.kernels import expert_sums
    from hcconvert.kernels.expert_sums import expert_act_sums, expert_act_sums_torch

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    # gate/up as halves of one fused [E, 2F, H] tensor, as several HF checkpoints store them;
    # the same buffer is the bare GEMM's right-hand side.
    w_cat = torch.randn(E, 2 * F, H, device=device, dtype=dtype, generator=gen) / H**0.5
    w_gate, w_up = w_cat[:, :F], w_cat[:, F:]
    gemm_out = torch.empty(T, 2 * F, device=device, dtype=dtype)

    def bare_gemm():
        for e in range(E):
            torch.matmul(x, w_cat[e].t(), out=gemm_out)

    fused = expert_act_sums(x, w_gate, w_up)
    ref = expert_act_sums_torch(x, w_gate, w_up, chunk_tokens=unfused_chunk)
    err = ((fused - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    results = {
        "fused": _time_ms(lambda: expert_act_sums(x, w_gate, w_up), warmup, reps),
        "unfused": _time_ms(
            lambda: expert_act_sums_torch(x, w_gate, w_up, chunk_tokens=unfused_chunk),
            warmup,
            reps,
        ),
        "gemm": _time_ms(bare_gemm, warmup, reps),
    }
    flops = 2.0 * T * H * (2 * F) * E

    n_fblocks = -(-F // expert_sums.BLOCK_F)
    n_tiles_t = -(-T // expert_sums.BLOCK_T)
    splits = expert_sums._choose_splits(n_tiles_t, E * n_fblocks, x.device)
    tiles_per_split = -(-n_tiles_t // splits)
    splits = -(-n_tiles_t // tiles_per_split)

    rows = []
    for method, ms in results.items():
        rows.append(
            f"| {name} | {method} | {ms:.2f} | {flops / ms / 1e9:.1f} "
            f"| {results['unfused'] / ms:.2f}x | {results['gemm'] / ms:.2f} |"
        )
    info = (
        f"{name}: T={T} H={H} F={F} E={E} {str(dtype).removeprefix('torch.')}, "
        f"grid {n_fblocks * splits} x {E} programs ({splits} token splits), "
        f"max|fused - unfused| / max|S| = {err:.2e}"
    )
    return rows, info, err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 8192 instead of 65536")
    parser.add_argument("--tokens", type=int, default=None, help="override T")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--unfused-chunk",
        type=int,
        default=16384,
        help="token chunk of the unfused torch path (its [chunk, F] temporaries are fp32)",
    )
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernel.py needs a CUDA GPU; none found, nothing to benchmark.")
        return 0

    T = args.tokens or (8192 if args.quick else 65536)
    dtype = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", end="")
    import triton

    print(f", triton {triton.__version__}\n")
    table = [
        "| model | method | ms | TFLOP/s | speedup vs unfused | fraction of bare GEMM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    infos = []
    ok = True
    for name in args.models:
        H, F, E = MODELS[name]
        rows, info, err = run_model(
            name, H, F, E, T, dtype, args.warmup, args.reps, args.unfused_chunk
        )
        table += rows
        torch.cuda.empty_cache()  # release this model's buffers before the next one
        infos.append(info)
        # bf16: the unfused path rounds the GEMM outputs to bf16 (unit roundoff 2^-8).
        ok &= err < 2e-2
    print("\n".join(table))
    print()
    print("\n".join(infos))
    if not ok:
        print("MISMATCH: fused kernel and torch twin disagree beyond 2e-2 of max|S|")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
