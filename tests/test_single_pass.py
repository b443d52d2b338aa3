"""Every FLOP once (issue 14): one routing pass and one routed forward per MoE layer serve the
statistics and the next layer's input, and the forward that also sums the activations for the
output statistics gives the same outputs and statistics as the separate passes did."""

import os
import subprocess
import sys

import pytest
import torch
from checkpoints import save_tiny_mixtral
from expert_sets import biased_permuted_copies, random_experts

from hcconvert.cli.demo import data_file
from hcconvert.methods import statistics
from hcconvert.methods.statistics import output_means
from hcconvert.model import experts as experts_module
from hcconvert.model.activation import SILU, Activation
from hcconvert.model.decoder import ATTENTION_BATCH
from hcconvert.model.experts import Experts, RoutedExperts, RoutingRecord, padded_rows
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

SAMPLES = 6  # two batches of ATTENTION_BATCH sequences, the last one short


def routed_inputs(experts: Experts, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = experts.gate.shape[2]
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, len(experts), generator=gen)
    weights, index = logits.softmax(-1).topk(2, dim=-1)
    return x, index, weights


@pytest.mark.parametrize("experts", [random_experts(count=5), biased_permuted_copies(
    [torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in range(3)])],
    ids=["silu", "gpt-oss"])
def test_summing_forward_gives_the_same_outputs_and_means(monkeypatch, experts):
    # Chunks far smaller than the tokens, so rows are picked across several chunks.
    monkeypatch.setattr(experts_module, "SUM_CHUNK_TOKENS", 7)
    x, index, weights = routed_inputs(experts, 50, seed=1)
    index[:, 0] = torch.where(index[:, 0] == 1, 0, index[:, 0])  # some expert left unpicked
    index[:, 1] = torch.where(index[:, 1] == 1, 2, index[:, 1])
    plain = RoutingRecord(x.shape[0], saliency=True)
    summing = RoutingRecord(x.shape[0], saliency=True, activation_sums=True)
    expected = RoutedExperts(experts, plain)(x, index, weights)
    torch.testing.assert_close(RoutedExperts(experts, summing)(x, index, weights), expected,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(summing.mean_saliency(len(experts)),
                               plain.mean_saliency(len(experts)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(output_means(x, experts, summing.sums), output_means(x, experts),
                               rtol=1e-5, atol=1e-6)


class Counter:
    """Counts calls of a function, and which objects the calls came from."""

    def __init__(self, monkeypatch, owner, name: str):
        self.calls, self.callers = 0, []
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            self.callers.append(args[0] if args else None)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("method", [{"method": "o-prune"}, {"method": "hc-smoe"}],
                         ids=["o-prune", "hc-smoe"])
def test_one_routing_pass_and_one_routed_forward_per_moe_layer(tmp_path, monkeypatch, method):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    save_tiny_mixtral(tmp_path / "src")
    routers = Counter(monkeypatch, MixtralTopKRouter, "forward")
    forwards = Counter(monkeypatch, RoutedExperts, "forward")
    separate_sums = Counter(monkeypatch, statistics, "_all_activation_sums")
    options = ConvertOptions(**method, experts=4, calib=str(data_file("demo_calib.txt")),
                             calib_samples=SAMPLES, seq_len=32, device="cpu")
    convert(str(tmp_path / "src"), tmp_path / "out", options, progress=False)
    batches, layers = -(-SAMPLES // ATTENTION_BATCH), 2
    assert forwards.calls == routers.calls == batches * layers  # each token routed once
    assert len({id(module) for module in forwards.callers}) == layers  # one module per layer
    assert separate_sums.calls == 0  # the output means came from the forward's products


def test_bfloat16_summing_forward_keeps_fp32_sums_of_bf16_products():
    """With --compute-dtype bfloat16 the products run in bf16 (as the CUDA kernel's do), the
    activations and their sums in fp32: the means stay within bf16 rounding of fp32's."""
    experts = random_experts(count=4, ffn=32, hidden=16)
    x, index, weights = routed_inputs(experts, 200, seed=2)
    record = RoutingRecord(x.shape[0], activation_sums=True)
    out = RoutedExperts(experts.to(dtype=torch.bfloat16), record)(x.bfloat16(), index, weights)
    assert out.dtype == record.inputs.dtype == torch.bfloat16
    assert record.sums.dtype == torch.float32
    expected = output_means(x, experts)
    scale = expected.abs().mean()
    assert ((output_means(x, experts, record.sums) - expected).abs() / scale).max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_activations_are_closer_to_fp32_than_rounded_products(dtype):
    """oneDNN's fused products form SiLU(gate) · up from the fp32 accumulators: within half
    precision of fp32's activations, and no further off than the plain half-precision ones
    (products rounded, then SiLU and product rounded again)."""
    if not experts_module._fused_products_available(dtype):
        pytest.skip("no oneDNN fused products on this CPU")
    experts = random_experts(count=2, ffn=64, hidden=48)
    x = torch.randn(100, 48, generator=torch.Generator().manual_seed(4))
    half = experts.to(dtype=dtype)
    fused = half.fused_hidden(x.to(dtype), 1)
    plain = half.activation(*half.projections(x.to(dtype), 1))
    exact = half.to(dtype=torch.float32).hidden(x.to(dtype).float(), 1)
    assert fused.dtype == dtype

    def error(got):
        return float((got.float() - exact).norm() / exact.norm())
    assert error(fused) < 4e-3 and error(fused) <= error(plain)
    assert experts.fused_hidden(x, 1) is None  # fp32: the plain products
    gpt_oss = biased_permuted_copies([torch.arange(16)]).to(dtype=dtype)
    assert gpt_oss.fused_hidden(x[:, :gpt_oss.gate.shape[2]].to(dtype), 0) is None


def test_summing_forward_fused_or_not_gives_the_same_outputs_and_means(monkeypatch):
    """The summing forward in bf16 through the fused products and through the plain ones
    (oneDNN missing) agree within bf16 rounding, outputs and means."""
    if not experts_module._fused_products_available(torch.bfloat16):
        pytest.skip("no oneDNN fused products on this CPU")
    experts = random_experts(count=4, ffn=32, hidden=16).to(dtype=torch.bfloat16)
    x, index, weights = routed_inputs(experts, 200, seed=5)
    x = x.bfloat16()

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        record = RoutingRecord(x.shape[0], activation_sums=True)
        out = RoutedExperts(experts, record)(x, index, weights)
        return out.float(), output_means(x.float(), experts.to(dtype=torch.float32),
                                         record.sums)
    fused = forward()
    monkeypatch.setattr(experts_module, "_fused_products_available", lambda dtype: False)
    plain = forward()
    for got, expected in zip(fused, plain, strict=True):
        assert (got - expected).abs().max() < 2e-2 * expected.abs().max()


def test_half_precision_experts_run_where_onednn_cannot_fuse_them():
    """On a CPU without AVX-512 oneDNN has no fused half-precision linear: the probe says so
    and the summing forward runs the plain products (a subprocess with oneDNN held to AVX2)."""
    script = """
import platform, torch
from hcconvert.model import experts
from hcconvert.model.experts import Experts, RoutedExperts, RoutingRecord
assert not experts._fused_products_available(torch.bfloat16) or platform.machine() != "x86_64"
gen = torch.Generator().manual_seed(0)
stacked = Experts(*(torch.randn(3, 8, 16, generator=gen).bfloat16() for _ in range(2)),
                  torch.randn(3, 16, 8, generator=gen).bfloat16())
x = torch.randn(40, 16, generator=gen).bfloat16()
index = torch.randint(0, 3, (40, 1), generator=gen)
record = RoutingRecord(40, activation_sums=True)
out = RoutedExperts(stacked, record)(x, index, torch.ones(40, 1))
assert out.isfinite().all() and record.sums.isfinite().all() and record.sums.abs().sum() > 0
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("activation", [SILU, Activation("clamped_swiglu", 1.702, 7.0)],
                         ids=["silu", "gpt-oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_fp32_activations_equal_the_plain_ones(activation, dtype):
    gen = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(64, 48, generator=gen).mul(4).to(dtype) for _ in range(2))
    expected = activation(gate.float(), up.float())
    assert torch.equal(activation.in_fp32(gate.clone(), up), expected)


def test_padded_rows_are_few_sizes_and_little_extra_work():
    sizes = [padded_rows(rows) for rows in range(1, 4097)]
    assert all(rows <= size <= 1.125 * rows for rows, size in enumerate(sizes, 1))
    assert len(set(sizes[:1024])) == 64  # 15 exact sizes below 16, then 8 per octave


@pytest.mark.parametrize("activation_sums", [False, True], ids=["plain", "summing"])
def test_half_precision_routed_products_come_in_padded_shapes(monkeypatch, activation_sums):
    """bf16 on the CPU: every product over routed rows has a padded row count (oneDNN compiles
    and keeps one primitive per shape), and the outputs are those of the unpadded rows. (The
    summing forward's gate and up run on all of x, the same shape every batch.)"""
    experts = random_experts(count=4, ffn=32, hidden=16).to(dtype=torch.bfloat16)
    x, index, weights = routed_inputs(experts, 300, seed=3)
    x = x.bfloat16()
    expected = torch.zeros_like(x)
    for e in range(len(experts)):
        token, slot = torch.where(index == e)
        expected.index_add_(0, token, (experts.output(x[token], e)
                                       * weights[token, slot, None]).bfloat16())
    rows, linear, fused = [], experts_module.F.linear, experts_module.Experts.fused_hidden
    monkeypatch.setattr(experts_module.F, "linear",
                        lambda a, *args: rows.append(a.shape) or linear(a, *args))
    # The fused products (oneDNN too) of the plain forward come in padded shapes as well.
    monkeypatch.setattr(experts_module.Experts, "fused_hidden",
                        lambda self, a, e: rows.append(a.shape) or fused(self, a, e))
    record = RoutingRecord(x.shape[0], activation_sums=activation_sums)
    got = RoutedExperts(experts, record)(x, index, weights)
    routed = [n for n, width in rows if not activation_sums or width == experts.down.shape[2]]
    assert all(padded_rows(n) == n for n in routed) and any(n > 16 for n in routed)
    # Both forwards' activations come from the same fused products (where oneDNN is).
    assert (got.float() - expected.float()).abs().max() < 2e-2 * expected.float().abs().max()
