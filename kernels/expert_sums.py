"""Fused per-expert activation sums for SwiGLU MoE experts.

For hidden states ``x`` [T, H] and one layer's expert weights ``w_gate``, ``w_up`` [E, F, H]
(HF ``nn.Linear`` layout, ``[out, in]``) this computes, in float32,

    S[e, f] = sum_t silu(x_t . w_gate[e, f]) * (x_t . w_up[e, f])

The mean expert output then follows by linearity, ``(S[e] / T) @ w_down[e].T``, so the
[T, F] activations never have to exist in memory.

Two implementations with the same semantics:

* :func:`expert_act_sums` -- a Triton kernel that computes both GEMM tiles on chip, applies
  ``silu(g) * u``, reduces over tokens in registers and writes only ``[splits, E, F]`` partial
  sums, which are summed in a fixed order (deterministic, no atomics). Runs on CUDA, or on CPU
  tensors under ``TRITON_INTERPRET=1`` (which must be set before this module is imported).
* :func:`expert_act_sums_torch` -- the pure-torch twin, chunked over tokens, float32
  accumulation; runs anywhere torch runs and needs no triton.
"""

from __future__ import annotations

import functools

# The repository's kernels/ folder is no package of its own (no __init__.py), so an installed
# package named `kernels` (transformers imports the PyPI one) is never shadowed by it; from the
# repository root it is still found as an empty namespace, and this module must not be used
# from there under a name that is not its own.
if __name__ != "hcconvert.kernels.expert_sums":
    raise ImportError(f"import this module as hcconvert.kernels.expert_sums, not {__name__}")

import torch

try:  # triton is a declared dependency, but keep the torch twin importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

__all__ = ["expert_act_sums", "expert_act_sums_torch"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Tuning constants (GPU), for Hopper/Ampere-class GPUs (H100, A100) at MoE shapes
# (H 2048-7168, F 1408-14336). Set from the tile arithmetic below and checked by compiling for
# sm_80/sm_90 (ptxas -v), but not yet timed on a GPU: re-tune with bench/bench_kernel.py.
# ---------------------------------------------------------------------------------------------
# Tokens per tile = the M dimension of both GEMM tiles. 128 rows keep the tensor cores busy and
# amortise each weight tile load over 128 tokens (weights are re-read once per token tile).
BLOCK_T = 128
# Features per tile = the N dimension. There are two fp32 accumulators (gate and up), so the
# effective N is 2 * 64 = 128: 2 x [128, 64] fp32 = 64 KB of registers, ~64 regs/thread with 8
# warps -- large tiles without spilling.
BLOCK_F = 64
# Reduction step over H for half-precision inputs: 64 x 2 B = 128 B rows (whole cache lines).
# One pipeline stage holds x [128, 64] + 2 x w [64, 64] = 32 KB of shared memory.
BLOCK_H = 64
# Reduction step for fp32 inputs. tl.dot with input_precision="ieee" runs on the CUDA cores
# (FMA) with operand fragments held in registers: a step of 32 needs 255 registers and spills
# on sm_90 (ptxas -v), 16 compiles spill-free (32 KB smem per stage). FMA throughput, not the K
# step, bounds this path, so the shorter step costs little.
BLOCK_H_FP32 = 16
NUM_WARPS = 8  # 256 threads share the two [128, 64] accumulators (see BLOCK_F)
# 3 x 32 KB software-pipeline stages (cp.async, no TMA): hides HBM latency and fits A100
# (164 KB) and H100 (228 KB) smem. Triton 3.9 compiles the bf16 kernel for sm_90 to wgmma with
# 96 KB smem, 172 registers/thread and no spills (1 CTA of 8 warps per SM).
NUM_STAGES = 3
# Launch-order swizzle: consecutive programs cover GROUP_F feature blocks x all token splits of
# one expert, so a weight tile is read by ~`splits` concurrently running programs and an x tile
# by GROUP_F of them -- both mostly hit L2 instead of HBM (as in the Triton matmul tutorial).
GROUP_F = 8
# Occupancy target: at least this many programs per SM so that the tail of the grid is short.
PROGRAMS_PER_SM = 4
# Lower bound on token splits (when T allows it) so that the swizzle above has several programs
# sharing each weight tile. Without that sharing every program streams its weight tile from
# HBM once per token tile: BLOCK_T = 128 bf16 FLOP/B, under H100's ~300 FLOP/B ridge point.
MIN_SPLITS = 8
# Each split should loop over at least this many token tiles, so the per-program setup and the
# partial-sum write are amortised.
MIN_TILES_PER_SPLIT = 4

# Interpreter (TRITON_INTERPRET=1, CPU) configuration. The interpreter runs each program in
# Python, ~1 ms per block op regardless of tile size, so cost ~ number of tile steps: use tiles
# big enough to keep the test suite fast yet small enough that small test shapes still cross
# tile boundaries (T=37 -> 2 token tiles, H=40/72 -> full + partial H steps, F=45 -> 3 feature
# blocks). 16 is tl.dot's minimum block dim. A fixed 3 token splits exercises uneven splits.
INTERPRET_BLOCK_T = 32
INTERPRET_BLOCK_F = 16
INTERPRET_BLOCK_H = 32
INTERPRET_SPLITS = 3

# Compute-dtype codes passed to the kernel as a constexpr (plain ints are the most portable
# constexpr type across Triton versions).
_COMPUTE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Input checking (shared by the kernel launcher and the twin)
# ---------------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if w_gate.dim() != 3 or w_up.dim() != 3:
        raise ValueError(
            "w_gate and w_up must be [E, F, H], got shapes "
            f"{tuple(w_gate.shape)} and {tuple(w_up.shape)}"
        )
    if w_gate.shape != w_up.shape:
        raise ValueError(
            "w_gate and w_up must have the same shape [E, F, H], got "
            f"{tuple(w_gate.shape)} (w_gate) vs {tuple(w_up.shape)} (w_up)"
        )
    if x.shape[1] != w_gate.shape[2]:
        raise ValueError(
            f"hidden size mismatch: x is [T, H={x.shape[1]}] but the expert weights are "
            f"[E, F, H={w_gate.shape[2]}]"
        )
    if not (x.device == w_gate.device == w_up.device):
        raise ValueError(
            f"x, w_gate and w_up must be on the same device, got {x.device}, "
            f"{w_gate.device} and {w_up.device}"
        )


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)  # bf16 + fp16 -> fp32
    return dtype


# ---------------------------------------------------------------------------------------------
# Pure-torch twin
# ---------------------------------------------------------------------------------------------
def expert_act_sums_torch(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Pure-torch ``S[e, f] = sum_t silu(x_t . w_gate[e, f]) * (x_t . w_up[e, f])``.

    Args:
        x: hidden states ``[T, H]`` (fp32, bf16 or fp16).
        w_gate, w_up: expert weights ``[E, F, H]`` (may be strided views).
        chunk_tokens: tokens per chunk; bounds the temporaries at ``2 * chunk_tokens * F`` fp32.

    Returns:
        ``[E, F]`` float32 on ``x.device``.

    The GEMMs run in the inputs' common dtype on CUDA (tensor cores, fp32 accumulation inside
    cuBLAS, result rounded to that dtype) and in fp32 on CPU (exact products of half inputs,
    and fast on every CPU); ``silu(g) * u`` and the token sum are always fp32.
    """
    _check_inputs(x, w_gate, w_up)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    T = x.shape[0]
    E, F, _ = w_gate.shape
    out = torch.zeros(E, F, dtype=torch.float32, device=x.device)
    if T == 0 or out.numel() == 0:
        return out
    gemm_dtype = _common_dtype(x, w_gate, w_up) if x.device.type == "cuda" else torch.float32
    for e in range(E):
        wg_t = w_gate[e].to(gemm_dtype).t()
        wu_t = w_up[e].to(gemm_dtype).t()
        acc = out[e]
        for t0 in range(0, T, chunk_tokens):
            xc = x[t0 : t0 + chunk_tokens].to(gemm_dtype)
            g = (xc @ wg_t).float()
            u = (xc @ wu_t).float()
            acc += (torch.nn.functional.silu(g) * u).sum(0)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _expert_act_sums_kernel(
        x_ptr,  # [T, H], unit stride along H
        wg_ptr,  # [E, F, H], unit stride along H
        wu_ptr,  # [E, F, H], unit stride along H
        part_ptr,  # [n_splits, E, F] fp32, contiguous
        T,
        F,
        H,
        n_experts,
        stride_xt,
        stride_ge,
        stride_gf,
        stride_ue,
        stride_uf,
        tiles_per_split,
        n_splits,
        n_fblocks,
        COMPUTE: tl.constexpr,  # 0: fp32, 1: bf16, 2: fp16 (operand dtype fed to tl.dot)
        DOT_FP32: tl.constexpr,  # interpreter + bf16 only: feed tl.dot fp32 operand copies
        BLOCK_T: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GROUP_F: tl.constexpr,
    ):
        # ---- which (expert, feature block, token split) this program owns -------------------
        pid = tl.program_id(0)
        pid_e = tl.program_id(1)
        # Grouped order: GROUP_F feature blocks x all splits are consecutive pids (L2 reuse).
        progs_per_group = GROUP_F * n_splits
        group_id = pid // progs_per_group
        first_f = group_id * GROUP_F
        group_size = tl.minimum(n_fblocks - first_f, GROUP_F)
        local = pid % progs_per_group
        pid_f = first_f + local % group_size
        pid_s = local // group_size

        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        offs_h = tl.arange(0, BLOCK_H)
        offs_tt = tl.arange(0, BLOCK_T)

        # Weight tiles are read as [BLOCK_H, BLOCK_F] (w^T) straight from the [F, H] layout.
        # 64-bit offsets: E * F * H can exceed 2**31 for large MoE layers.
        wg_base = (
            wg_ptr
            + pid_e.to(tl.int64) * stride_ge
            + offs_f[None, :].to(tl.int64) * stride_gf
            + offs_h[:, None]
        )
        wu_base = (
            wu_ptr
            + pid_e.to(tl.int64) * stride_ue
            + offs_f[None, :].to(tl.int64) * stride_uf
            + offs_h[:, None]
        )

        t_begin = pid_s * tiles_per_split * BLOCK_T
        t_stop = tl.minimum(t_begin + tiles_per_split * BLOCK_T, T)

        acc = tl.zeros([BLOCK_F], dtype=tl.float32)
        for t0 in range(t_begin, t_stop, BLOCK_T):
            offs_t = t0 + offs_tt
            mask_t = offs_t < t_stop
            x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_h[None, :]
            wg_ptrs = wg_base
            wu_ptrs = wu_base
            g = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
            u = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                mask_h = offs_h < H - h0
                xt = tl.load(x_ptrs, mask=mask_t[:, None] & mask_h[None, :], other=0.0)
                wgt = tl.load(wg_ptrs, mask=mask_h[:, None] & mask_f[None, :], other=0.0)
                wut = tl.load(wu_ptrs, mask=mask_h[:, None] & mask_f[None, :], other=0.0)
                if COMPUTE == 0:
                    xt = xt.to(tl.float32)
                    wgt = wgt.to(tl.float32)
                    wut = wut.to(tl.float32)
                elif COMPUTE == 1:
                    xt = xt.to(tl.bfloat16)
                    wgt = wgt.to(tl.bfloat16)
                    wut = wut.to(tl.bfloat16)
                else:
                    xt = xt.to(tl.float16)
                    wgt = wgt.to(tl.float16)
                    wut = wut.to(tl.float16)
                if DOT_FP32:
                    # Exact: products of bf16 values are representable in fp32, and the GPU
                    # path accumulates in fp32 as well, so results are unchanged.
                    xt = xt.to(tl.float32)
                    wgt = wgt.to(tl.float32)
                    wut = wut.to(tl.float32)
                # "ieee": fp32 operands get a true fp32 product (no TF32); the option is
                # ignored for bf16/fp16 operands, which always accumulate in fp32 here.
                g = tl.dot(xt, wgt, g, input_precision="ieee")
                u = tl.dot(xt, wut, u, input_precision="ieee")
                x_ptrs += BLOCK_H
                wg_ptrs += BLOCK_H
                wu_ptrs += BLOCK_H
            act = g * tl.sigmoid(g) * u
            # Padded tokens load as 0 and give silu(0) * 0 = 0 anyway; mask explicitly so the
            # result never depends on that. Padded features are simply not stored.
            act = tl.where(mask_t[:, None], act, 0.0)
            acc += tl.sum(act, axis=0)

        out_ptrs = part_ptr + (pid_s * n_experts + pid_e).to(tl.int64) * F + offs_f
        tl.store(out_ptrs, acc, mask=mask_f)

    # Under TRITON_INTERPRET=1 (read by triton.jit when the module is imported) the decorator
    # returns an InterpretedFunction that runs on CPU tensors.
    _INTERPRET = type(_expert_act_sums_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _expert_act_sums_kernel = None
    _INTERPRET = False


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_splits(n_tiles_t: int, n_e_fblocks: int, device: torch.device) -> int:
    """Number of token splits: enough programs to fill the GPU, bounded by the token tiles."""
    if _INTERPRET or device.type != "cuda":
        splits = INTERPRET_SPLITS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        target_programs = PROGRAMS_PER_SM * _sm_count(index)
        splits = max(_cdiv(target_programs, n_e_fblocks), MIN_SPLITS)
        splits = min(splits, max(1, n_tiles_t // MIN_TILES_PER_SPLIT))
    return max(1, min(splits, n_tiles_t))


def expert_act_sums(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton ``S[e, f] = sum_t silu(x_t . w_gate[e, f]) * (x_t . w_up[e, f])``.

    Args:
        x: hidden states ``[T, H]`` (fp32, bf16 or fp16).
        w_gate, w_up: expert weights ``[E, F, H]`` in HF ``[out, in]`` layout; strided views
            (e.g. halves of a fused ``[E, 2F, H]`` gate_up tensor) are used in place as long as
            the last dim is contiguous (otherwise a contiguous copy is made).
        splits: override the number of token splits (testing/benchmarking); by default chosen
            from T, E, F and the SM count.

    Returns:
        ``[E, F]`` float32 on ``x.device``. Deterministic: per-split partial sums are reduced
        in a fixed order.

    Mixed input dtypes are computed in their promoted dtype (bf16 + fp16 -> fp32). fp32 inputs
    use exact fp32 products (no TF32).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use expert_act_sums_torch instead")
    _check_inputs(x, w_gate, w_up)
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"expert_act_sums needs CUDA tensors (got device {x.device}); set "
            "TRITON_INTERPRET=1 before importing triton to run it on CPU, or use "
            "expert_act_sums_torch"
        )
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")

    T, H = x.shape
    E, F, _ = w_gate.shape
    if T == 0 or E == 0 or F == 0 or H == 0:
        return torch.zeros(E, F, dtype=torch.float32, device=x.device)

    # The kernel assumes unit stride along H (vectorised loads); other strides are honoured.
    if x.stride(1) != 1:
        x = x.contiguous()
    if w_gate.stride(2) != 1:
        w_gate = w_gate.contiguous()
    if w_up.stride(2) != 1:
        w_up = w_up.contiguous()

    compute = _common_dtype(x, w_gate, w_up)
    if _INTERPRET:
        block_t, block_f, block_h = INTERPRET_BLOCK_T, INTERPRET_BLOCK_F, INTERPRET_BLOCK_H
    else:
        block_t, block_f = BLOCK_T, BLOCK_F
        block_h = BLOCK_H_FP32 if compute == torch.float32 else BLOCK_H

    n_tiles_t = _cdiv(T, block_t)
    n_fblocks = _cdiv(F, block_f)
    if splits is None:
        n_splits = _choose_splits(n_tiles_t, E * n_fblocks, x.device)
    else:
        n_splits = min(splits, n_tiles_t)
    tiles_per_split = _cdiv(n_tiles_t, n_splits)
    n_splits = _cdiv(n_tiles_t, tiles_per_split)  # drop splits that would get no tokens

    partial = torch.empty(n_splits, E, F, dtype=torch.float32, device=x.device)
    grid = (n_fblocks * n_splits, E)
    _expert_act_sums_kernel[grid](
        x,
        w_gate,
        w_up,
        partial,
        T,
        F,
        H,
        E,
        x.stride(0),
        w_gate.stride(0),
        w_gate.stride(1),
        w_up.stride(0),
        w_up.stride(1),
        tiles_per_split,
        n_splits,
        n_fblocks,
        COMPUTE=_COMPUTE_CODES[compute],
        # The interpreter's tl.dot multiplies the raw uint16 bit patterns of bfloat16 operands
        # (triton-lang/triton#11584, not fixed upstream); upcast there. Never set on GPU.
        DOT_FP32=_INTERPRET and compute == torch.bfloat16,
        BLOCK_T=block_t,
        BLOCK_F=block_f,
        BLOCK_H=block_h,
        GROUP_F=GROUP_F,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if n_splits == 1:
        return partial[0]
    return partial.sum(0)  # fixed-order reduction over splits: deterministic, no atomics
