"""Tests for the fused expert activation-sum kernel and its pure-torch twin.

Without CUDA the Triton kernel runs in the CPU interpreter (TRITON_INTERPRET=1), which is slow:
shapes are kept small, and the interpreter's block sizes (kernels/expert_sums.py
INTERPRET_BLOCK_*: T 32, F 16, H 32) are what the "partial tile" comments below refer to.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before triton decorates the kernel (tests/conftest.py does the same, earlier,
    # for the case where another test module imports the kernel first).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hcconvert.kernels import expert_sums  # noqa: E402
from hcconvert.kernels.expert_sums import expert_act_sums, expert_act_sums_torch  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

if not HAS_CUDA and not expert_sums._INTERPRET:
    pytest.skip(
        "hcconvert.kernels.expert_sums was imported before TRITON_INTERPRET=1 was set and there "
        "is no GPU; set TRITON_INTERPRET=1 in tests/conftest.py",
        allow_module_level=True,
    )

# Tolerances, relative to max|S| (used as atol scale) and as rtol. The kernel keeps g and u in
# fp32 (exact products of the inputs, fp32 accumulation over H and T); the twin matches that on
# CPU, but on CUDA its GEMM output is rounded to the input dtype before silu*mul (unit roundoff
# u = 2^-8 for bf16, 2^-11 for fp16), so each summand can differ by ~2u relative. The table
# allows ~5u. For fp32 both sides are true fp32 (the kernel asks tl.dot for "ieee", i.e. no
# TF32), so only summation order differs; 5e-5 would still catch a TF32 path (error ~1e-3).
TOL = {
    torch.float32: 5e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}


def _make(T, E, F, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    # ~1/sqrt(H) scaling keeps g and u O(1), like real checkpoints, so silu is non-trivial.
    wg = torch.randn(E, F, H, generator=g) / H**0.5
    wu = torch.randn(E, F, H, generator=g) / H**0.5
    return (t.to(dtype=dtype, device=DEVICE) for t in (x, wg, wu))


def _assert_close(actual, expected, tol):
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _naive_f64(x, wg, wu):
    x64, wg64, wu64 = (t.double().cpu() for t in (x, wg, wu))
    out = []
    for e in range(wg64.shape[0]):
        g = x64 @ wg64[e].T
        u = x64 @ wu64[e].T
        out.append((torch.nn.functional.silu(g) * u).sum(0))
    return torch.stack(out)


SHAPES = [
    # (T, E, F, H)
    # single token, single expert, every dim exactly one tile (F=16, H=32): no masking at all
    pytest.param(1, 1, 16, 32, id="T1-E1-exact"),
    # single token (31 of 32 tile rows masked), 8 experts, odd F and H: partial F and H tiles
    pytest.param(1, 8, 45, 33, id="T1-E8-F45-H33"),
    # H=24 < BLOCK_H: the only H step is partial; T=37 -> 2 token tiles -> 2 splits
    pytest.param(37, 1, 20, 24, id="T37-E1-F20-H24"),
    # H=40: one full + one partial H step; odd F=45: 3 feature blocks, the last has 13 valid
    pytest.param(37, 8, 45, 40, id="T37-E8-F45-H40"),
    # T=300 -> 10 token tiles over 3 uneven splits (4, 4, 2 tiles; last tile has 12 rows);
    # H=72: two full + one partial H step
    pytest.param(300, 8, 45, 72, id="T300-E8-F45-H72"),
    # long token reduction with F smaller than one feature block and odd H=33
    pytest.param(300, 2, 9, 33, id="T300-E2-F9-H33"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),  # tl.dot input_precision="ieee" path
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,F,H", SHAPES)
def test_kernel_matches_twin(T, E, F, H, dtype):
    x, wg, wu = _make(T, E, F, H, dtype)
    got = expert_act_sums(x, wg, wu)
    ref = expert_act_sums_torch(x, wg, wu)
    assert got.shape == (E, F) and got.dtype == torch.float32 and got.device == x.device
    _assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_kernel_strided_views(layout):
    # gate/up as views of one fused [E, 2F, H] gate_up tensor (expert stride 2F*H, and for the
    # interleaved layout a feature stride of 2H), and x as a column slice of a wider buffer
    # (row stride != H). The kernel must honour the strides without copying.
    T, E, F, H = 37, 3, 45, 33
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    fused = (torch.randn(E, 2 * F, H, generator=g) / H**0.5).to(dtype=dtype, device=DEVICE)
    if layout == "halves":
        wg, wu = fused[:, :F], fused[:, F:]
    else:
        wg, wu = fused[:, 0::2], fused[:, 1::2]
    xbuf = torch.randn(T, H + 7, generator=g).to(dtype=dtype, device=DEVICE)
    x = xbuf[:, 3 : 3 + H]
    assert not wg.is_contiguous() and not x.is_contiguous()
    got = expert_act_sums(x, wg, wu)
    ref = expert_act_sums_torch(x.contiguous(), wg.contiguous(), wu.contiguous())
    _assert_close(got, ref, TOL[dtype])


def test_kernel_non_unit_last_stride_falls_back_to_copy():
    # w stored transposed ([E, H, F] memory, viewed as [E, F, H]): last dim not contiguous.
    T, E, F, H = 37, 2, 20, 24
    x, wg, wu = _make(T, E, F, H, torch.float32)
    wg_t = wg.transpose(1, 2).contiguous().transpose(1, 2)
    assert wg_t.stride(2) != 1
    _assert_close(expert_act_sums(x, wg_t, wu), expert_act_sums_torch(x, wg, wu), 5e-5)


def test_kernel_mixed_dtypes_promote():
    # bf16 activations with fp16 weights: computed in the promoted dtype (fp32).
    T, E, F, H = 37, 2, 20, 24
    x, _, _ = _make(T, E, F, H, torch.bfloat16)
    _, wg, wu = _make(T, E, F, H, torch.float16)
    _assert_close(expert_act_sums(x, wg, wu), expert_act_sums_torch(x, wg, wu), 5e-5)


@pytest.mark.parametrize("splits", [1, 2, 1000])
def test_kernel_split_override(splits):
    # 1: one program walks all 10 token tiles; 2: even split; 1000: clamped to one tile each.
    x, wg, wu = _make(300, 2, 20, 40, torch.float32)
    _assert_close(expert_act_sums(x, wg, wu, splits=splits), expert_act_sums_torch(x, wg, wu), 5e-5)


def test_kernel_deterministic():
    x, wg, wu = _make(300, 2, 45, 33, torch.bfloat16)
    a = expert_act_sums(x, wg, wu)
    b = expert_act_sums(x, wg, wu)
    assert torch.equal(a, b)
    assert torch.equal(expert_act_sums_torch(x, wg, wu), expert_act_sums_torch(x, wg, wu))


@pytest.mark.parametrize("fn", [expert_act_sums, expert_act_sums_torch])
def test_empty_tokens_give_zeros(fn):
    x, wg, wu = _make(0, 2, 20, 24, torch.float32)
    out = fn(x, wg, wu)
    assert out.shape == (2, 20) and out.dtype == torch.float32 and not out.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_twin_matches_naive_float64(dtype, chunk):
    # chunk=7 splits T=37 into 6 chunks (last one partial); 4096 is a single chunk.
    x, wg, wu = _make(37, 3, 45, 33, dtype)
    got = expert_act_sums_torch(x, wg, wu, chunk_tokens=chunk)
    ref = _naive_f64(x, wg, wu).to(got.device)
    # float64 reference vs fp32 accumulation (and, on CUDA, GEMM outputs rounded to dtype)
    _assert_close(got.double(), ref, TOL[dtype])


@pytest.mark.parametrize("fn", [expert_act_sums, expert_act_sums_torch])
def test_bad_inputs_raise(fn):
    x, wg, wu = _make(5, 2, 16, 32, torch.float32)
    with pytest.raises(ValueError, match=r"hidden size mismatch: x is \[T, H=31\]"):
        fn(x[:, :31], wg, wu)
    with pytest.raises(ValueError, match=r"same shape \[E, F, H\].*\(2, 16, 32\).*\(3, 16, 32\)"):
        fn(x, wg, torch.cat([wu, wu[:1]]))
    with pytest.raises(ValueError, match=r"same shape"):
        fn(x, wg, wu[:, :8])
    with pytest.raises(ValueError, match=r"x must be \[T, H\]"):
        fn(x[None], wg, wu)
    with pytest.raises(ValueError, match=r"\[E, F, H\]"):
        fn(x, wg[0], wu[0])
    with pytest.raises(ValueError, match=r"dtype torch.int64"):
        fn(x.long(), wg, wu)
