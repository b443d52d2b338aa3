"""Quantized storage codecs: layouts against transformers' and compressed-tensors' own code,
round trips, error bounds, config reading and bad input."""

import math

import pytest
import torch
from reference_codecs import (
    DEEPSEEK_V3,
    GPT_OSS,
    KIMI_K2_THINKING,
    reference_dequantize,
    reference_downcast_mxfp4,
    reference_pack,
    reference_quantize,
    reference_unpack,
)

from hcconvert.errors import UserError
from hcconvert.io.quantization import (
    Fp8Block,
    Mxfp4,
    PackedInt4,
    quant_format,
    quantize_with_error,
    quantized_weights,
    relative_error,
)
from hcconvert.io.tensors import SAFETENSORS_DTYPES


def random_fp8(shape, generator):
    """float8_e4m3fn values from random bytes, NaN codes (0x7F, 0xFF) replaced by 0."""
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    raw[(raw & 0x7F) == 0x7F] = 0
    return raw.view(torch.float8_e4m3fn)


def stored_plan(parts, base):
    """(name, dtype code, shape) of quantize's output, to hold against `planned`."""
    return [(base + suffix, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape))
            for suffix, t in parts.items()]


# --- fp8 blocks -------------------------------------------------------------------------------

# (weight shape, block): whole 128x128 blocks; a leading expert dimension; DeepSeek-V3's
# kv_a_proj_with_mqa kind of partial row block (576 = 4.5 x 128) at small size; partial blocks
# in both dimensions with a non-square block.
FP8_SHAPES = [((256, 384), (128, 128)), ((3, 128, 256), (128, 128)),
              ((72, 256), (16, 128)), ((50, 70), (16, 32))]


@pytest.mark.parametrize("shape,block", FP8_SHAPES)
def test_fp8_dequantize_matches_transformers(shape, block):
    from transformers.integrations.finegrained_fp8 import (
        Fp8Dequantize,
        _dequantize_fp8_weight,
    )

    g = torch.Generator().manual_seed(0)
    fmt = Fp8Block(block=block)
    values = random_fp8(shape, g)
    scale = torch.rand(fmt.scale_grid(shape), generator=g) * 1e-3 + 1e-5
    ours = fmt.dequantize("w", {".weight": values, ".weight_scale_inv": scale})
    # The training-path dequantizer handles partial edge blocks, as DeepSeek's weight_dequant.
    assert torch.equal(ours, _dequantize_fp8_weight(values, scale, list(block), torch.float32))
    if all(n % b == 0 for n, b in zip(shape[-2:], block, strict=True)):
        # The loading-path dequantizer (FineGrainedFP8Config(dequantize=True)) whole blocks only.
        loader = Fp8Dequantize(None)._dequantize_one(values, scale, output_dtype=torch.float32)
        assert torch.equal(ours, loader)


def test_fp8_requantizing_a_dequantized_weight_gives_its_bytes_back():
    # Blocks as a 448-amax quantizer writes them: every block holds a +-448, scales arbitrary.
    g = torch.Generator().manual_seed(1)
    fmt = Fp8Block()
    values = random_fp8((2, 256, 384), g).float()
    values[..., ::128, ::128] = 448.0 * torch.sign(torch.randn(2, 2, 3, generator=g))
    values = values.to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, 3, generator=g) * 1e-3 + 1e-6
    dense = fmt.dequantize("w", {".weight": values, ".weight_scale_inv": scale})
    parts = fmt.quantize("w", dense)
    assert torch.equal(parts[".weight"].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(parts[".weight_scale_inv"], scale)


def test_fp8_random_weights_round_trip_within_e4m3_precision():
    g = torch.Generator().manual_seed(2)
    fmt = Fp8Block()
    weight = torch.randn(256, 512, generator=g) * 0.02
    parts, error = quantize_with_error(fmt, "w", weight)
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself (measured
    # 0.027 here), and a block's smallest values are subnormal only below 448 * 2^-15 of amax.
    assert 0 < error < 2 ** -4
    assert stored_plan(parts, "w") == [(t.name, t.dtype, t.shape) for t in fmt.planned(
        "w", (256, 512))]
    # Our own output is a fixed point: the same bytes again.
    again = fmt.quantize("w", fmt.dequantize("w", parts))
    assert torch.equal(again[".weight"].view(torch.uint8), parts[".weight"].view(torch.uint8))
    assert torch.equal(again[".weight_scale_inv"], parts[".weight_scale_inv"])


def test_fp8_ue8m0_scales_are_powers_of_two_and_never_clip():
    fmt = quant_format({"quantization_config": {**DEEPSEEK_V3, "scale_fmt": "ue8m0"}})
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    parts = fmt.quantize("w", weight)
    scale = parts[".weight_scale_inv"]
    assert torch.equal(scale, torch.exp2(torch.round(torch.log2(scale))))
    # Rounding the scale up leaves every block's largest value at or below 448.
    assert parts[".weight"].float().abs().max() <= 448
    assert relative_error(weight, fmt.dequantize("w", parts)) < 2 ** -4


def test_fp8_zero_block_keeps_scale_one():
    weight = torch.zeros(128, 256)
    weight[:, 128:] = 1.0
    fmt = Fp8Block()
    parts = fmt.quantize("w", weight)
    assert parts[".weight_scale_inv"][0, 0] == 1.0
    assert torch.equal(fmt.dequantize("w", parts), weight)


def test_fp8_block_that_does_not_divide_is_refused_before_writing():
    fmt = Fp8Block()
    for shape in [(576, 256), (256, 100)]:
        with pytest.raises(UserError, match=r"layers\.3\.mlp\.experts\.0\.up_proj\.weight"):
            fmt.planned("layers.3.mlp.experts.0.up_proj", shape)
        with pytest.raises(UserError, match="does not divide"):
            fmt.quantize("x", torch.zeros(shape))


def test_fp8_scale_grid_that_does_not_fit_the_weight_is_named():
    fmt = Fp8Block()
    parts = {".weight": torch.zeros(256, 256, dtype=torch.float8_e4m3fn),
             ".weight_scale_inv": torch.ones(2, 1)}
    with pytest.raises(UserError, match=r"tensor q\.weight_scale_inv has shape \[2, 1\]"):
        fmt.dequantize("q", parts)
    with pytest.raises(UserError, match=r"q\.weight_scale_inv"):
        fmt.logical_shape("q", {".weight": (256, 256), ".weight_scale_inv": (1, 2)})


# --- compressed-tensors pack-quantized int4 ---------------------------------------------------
# reference_codecs restates compressed-tensors (not installed here) from its source.

# (rows, cols, group): one group per row; Kimi's group 32 over several int32 words; a column
# count that is not a multiple of 8 (the last int32 padded) with group 4; odd rows.
INT4_SHAPES = [(8, 32, 32), (64, 256, 32), (5, 12, 4), (3, 96, 32)]


@pytest.mark.parametrize("rows,cols,group", INT4_SHAPES)
def test_int4_dequantize_matches_compressed_tensors(rows, cols, group):
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=g)
    scale = (torch.rand(rows, cols // group, generator=g) * 0.01).to(torch.bfloat16)
    parts = {".weight_packed": reference_pack(q), ".weight_scale": scale,
             ".weight_shape": torch.tensor([rows, cols], dtype=torch.int32)}
    assert torch.equal(reference_unpack(parts[".weight_packed"], (rows, cols)), q)
    ours = PackedInt4(group_size=group).dequantize("w", parts, dtype=torch.bfloat16)
    assert torch.equal(ours, reference_dequantize(q, scale, group))


@pytest.mark.parametrize("rows,cols,group", INT4_SHAPES)
def test_int4_requantizing_stored_weights_gives_their_bytes_back(rows, cols, group):
    # Weights as compressed-tensors writes them: quantized with amax / 7.5, so each group's
    # largest value sits at +7 or -8 (or -7 after the bf16 scale rounds): our quantizer finds
    # the same scale and codes, though compressed-tensors' divisor alone would not. (Our
    # float32 dequantization is exact; compressed-tensors' bf16 one rounds q * scale.)
    g = torch.Generator().manual_seed(cols)
    weight = torch.randn(rows, cols, generator=g)
    q, scale = reference_quantize(weight, group)
    stored = {".weight_packed": reference_pack(q), ".weight_scale": scale,
              ".weight_shape": torch.tensor([rows, cols], dtype=torch.int32)}
    fmt = PackedInt4(group_size=group)
    parts = fmt.quantize("w", fmt.dequantize("w", stored))
    assert torch.equal(parts[".weight_packed"], stored[".weight_packed"])
    assert torch.equal(parts[".weight_scale"], scale)
    reference_only = reference_quantize(fmt.dequantize("w", stored), group)[1]
    assert not torch.equal(reference_only, scale)
    assert parts[".weight_shape"].tolist() == [rows, cols]
    assert stored_plan(parts, "w") == [(t.name, t.dtype, t.shape)
                                       for t in fmt.planned("w", (rows, cols))]


def test_int4_random_weights_do_no_worse_than_compressed_tensors():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(128, 512, generator=g) * 0.02
    fmt = PackedInt4()
    parts, error = quantize_with_error(fmt, "w", weight)
    q, scale = reference_quantize(weight, 32)
    reference_error = relative_error(weight, reference_dequantize(q, scale, 32).float())
    # Symmetric int4 in groups of 32 of Gaussian values: the step is about amax / 7.5 with
    # amax about 2.2 sigma, so the RMS error is near 0.085 of the RMS value (measured 0.088);
    # the per-group best of three scales is never worse than compressed-tensors' one.
    assert error <= reference_error < 0.11


def test_int4_weight_with_leading_expert_dimension():
    weight = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(5))
    fmt = PackedInt4()
    parts = fmt.quantize("experts", weight)
    assert parts[".weight_packed"].shape == (3, 16, 8)
    assert parts[".weight_shape"].tolist() == [3, 16, 64]
    restored = fmt.dequantize("experts", parts)
    for e in range(3):
        assert torch.equal(restored[e], fmt.dequantize("x", fmt.quantize("x", weight[e])))


def test_int4_shapes_that_do_not_fit_are_named():
    fmt = PackedInt4()
    with pytest.raises(UserError, match=r"experts\.1\.down_proj\.weight \[64, 48\]"):
        fmt.planned("experts.1.down_proj", (64, 48))
    parts = fmt.quantize("w", torch.randn(4, 64))
    parts[".weight_scale"] = parts[".weight_scale"][:, :1]
    with pytest.raises(UserError, match=r"tensor w\.weight_scale has shape \[4, 1\]"):
        fmt.dequantize("w", parts)


# --- mxfp4 ------------------------------------------------------------------------------------

def random_mxfp4(shape, generator, low=115, high=135):
    """Random blocks [..., R, G, 16] and scales [..., R, G] around exponent 0."""
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(low, high, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


# [E, R, G]: GPT-OSS's expert layout at small size; one row of one block; a single expert with
# many rows, decoded in chunks that do not divide the block count.
MXFP4_SHAPES = [(2, 8, 3), (1, 1, 1), (1, 64, 2)]


@pytest.mark.parametrize("shape", MXFP4_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantize_matches_transformers(shape, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4(shape, torch.Generator().manual_seed(6))
    parts = {"_blocks": blocks, "_scales": scales}
    ours = Mxfp4(rows_per_chunk=7).dequantize("w", parts, dtype=dtype)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    # Both give GPT-OSS's parameter [E, C, R], the transpose of the stored [E, R, C].
    assert torch.equal(ours, reference)


def test_mxfp4_requantizing_a_dequantized_weight_gives_its_bytes_back():
    # Blocks as a no-clip encoder writes them: the largest code of each block is 4 or 6 (a
    # block whose largest code is 3 reads the same at half the scale, so bytes differ there).
    g = torch.Generator().manual_seed(7)
    blocks, scales = random_mxfp4((2, 16, 4), g)
    codes = torch.stack((blocks & 0xF, blocks >> 4), dim=-1).flatten(-2)  # [..., 32]
    codes = torch.where((codes & 7) > 5, codes & 0x8 | 5, codes)  # at most code 5 (3.0)...
    codes[..., 0] = torch.tensor([6, 7, 14, 15])[torch.randint(0, 4, codes.shape[:-1],
                                                               generator=g)]  # ...then 4 or 6
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    fmt = Mxfp4()
    dense = fmt.dequantize("w", {"_blocks": blocks, "_scales": scales})
    parts = fmt.quantize("w", dense)
    assert torch.equal(parts["_blocks"], blocks)
    assert torch.equal(parts["_scales"], scales)


def test_mxfp4_encoder_matches_triton_kernels_reference():
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(3, 8, 128, generator=g)
    # Exact halfway points between e2m1 values (0.25, 0.75, ..., 5) at a block's own scale,
    # where rounding direction shows: the first value of each block pins the scale to 2^0.
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)
    weight[0, 0, :32] = ties
    weight[0, 1, :32] = -ties
    # The weight is the transpose of what is blocked: blocks run along its second-last axis.
    ours = Mxfp4().quantize("w", weight.transpose(1, 2))
    blocks, scales = reference_downcast_mxfp4(weight)
    assert torch.equal(ours["_blocks"], blocks)
    assert torch.equal(ours["_scales"], scales)


def test_mxfp4_random_weights_round_trip_within_e2m1_precision():
    weight = torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(9))
    fmt = Mxfp4()
    parts, error = quantize_with_error(fmt, "mlp.experts.down_proj", weight)
    # e2m1 has one mantissa bit and a power-of-two scale that can sit up to 2x above the block
    # amax / 6: relative RMS error near 0.11 for Gaussian blocks (measured 0.115).
    assert 0 < error < 0.14
    assert stored_plan(parts, "b") == [(t.name, t.dtype, t.shape)
                                       for t in fmt.planned("b", (4, 64, 96))]
    assert fmt.logical_shape("b", {k: v.shape for k, v in parts.items()}) == (4, 64, 96)


def test_mxfp4_shapes_that_do_not_fit_are_named():
    fmt = Mxfp4()
    with pytest.raises(UserError, match=r"mlp\.experts\.gate_up_proj \[2, 40, 8\]"):
        fmt.planned("mlp.experts.gate_up_proj", (2, 40, 8))
    blocks, scales = random_mxfp4((2, 8, 3), torch.Generator().manual_seed(10))
    with pytest.raises(UserError, match=r"gate_up_proj_blocks \[2, 8, 3, 16\]"):
        fmt.dequantize("gate_up_proj", {"_blocks": blocks, "_scales": scales[..., :2]})


# --- configs, exclusions, companion tensors ---------------------------------------------------

def test_formats_read_from_hub_configs():
    assert quant_format({}) is None
    assert quant_format({"quantization_config": DEEPSEEK_V3}) == Fp8Block(block=(128, 128))
    kimi = quant_format({"quantization_config": KIMI_K2_THINKING})
    assert kimi == PackedInt4(group_size=32, ignore=tuple(KIMI_K2_THINKING["ignore"]))
    gpt_oss = quant_format({"quantization_config": GPT_OSS})
    assert gpt_oss == Mxfp4(not_converted=tuple(GPT_OSS["modules_to_not_convert"]))
    assert (kimi.dense_name("a.b"), gpt_oss.dense_name("a.gate_up_proj")) == (
        "a.b.weight", "a.gate_up_proj")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "bitnet", None])
def test_unsupported_quantization_methods_are_named(method):
    with pytest.raises(UserError, match=f"quantization method {method!r} is not supported"):
        quant_format({"quantization_config": {"quant_method": method, "bits": 4}})


def with_weights(**changes):
    group = KIMI_K2_THINKING["config_groups"]["group_0"]
    weights = {**group["weights"], **changes}
    return {**KIMI_K2_THINKING, "config_groups": {"group_0": {**group, "weights": weights}}}


@pytest.mark.parametrize("settings,message", [
    ({**DEEPSEEK_V3, "weight_block_size": [128]}, "weight_block_size"),
    ({**DEEPSEEK_V3, "weight_block_size": None}, "weight_block_size"),
    ({**DEEPSEEK_V3, "activation_scheme": "static"}, "activation_scheme"),
    ({**DEEPSEEK_V3, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    ({**KIMI_K2_THINKING, "format": "float-quantized"}, "format 'float-quantized'"),
    ({**KIMI_K2_THINKING, "config_groups": {}}, "no config_groups"),
    (with_weights(num_bits=8), "4-bit"),
    (with_weights(symmetric=False), "4-bit"),
    (with_weights(strategy="channel", group_size=None), "4-bit"),
    (with_weights(actorder="group"), "4-bit"),
])
def test_malformed_configs_say_what_is_wrong(settings, message):
    with pytest.raises(UserError, match=message) as caught:
        quant_format({"quantization_config": settings})
    assert settings["quant_method"] in str(caught.value)
    assert "\n" not in str(caught.value)


MODULES = ["lm_head", "model.embed_tokens", "model.layers.3.self_attn",
           "model.layers.3.self_attn.q_proj", "model.layers.13.mlp.router",
           "model.layers.3.mlp.experts", "model.layers.1.mlp.experts.0.gate_proj",
           "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
           "model.layers.1.mlp.gate"]


def test_fp8_and_mxfp4_exclusions_agree_with_transformers():
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = GPT_OSS["modules_to_not_convert"] + ["layers.1", "gate"]
    fmt = Mxfp4(not_converted=tuple(patterns))
    excluded = [m for m in MODULES if fmt.excludes(m)]
    assert excluded == [m for m in MODULES if not should_convert_module(m, patterns)]
    assert "model.layers.3.mlp.experts" not in excluded and "lm_head" in excluded


def test_compressed_tensors_ignore_list():
    kimi = quant_format({"quantization_config": KIMI_K2_THINKING})
    assert [m for m in MODULES if not kimi.excludes(m)] == [
        "model.embed_tokens", "model.layers.13.mlp.router", "model.layers.3.mlp.experts",
        "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.gate"]


@pytest.mark.parametrize("fmt,dtypes,missing", [
    (Fp8Block(), {"e.0.up_proj.weight": "F8_E4M3", "norm.weight": "BF16"},
     "e.0.up_proj.weight_scale_inv"),
    (Fp8Block(), {"e.0.up_proj.weight_scale_inv": "F32"}, "e.0.up_proj.weight"),
    (PackedInt4(), {"e.0.up_proj.weight_packed": "I32", "e.0.up_proj.weight_shape": "I32"},
     "e.0.up_proj.weight_scale"),
    (Mxfp4(), {"mlp.experts.down_proj_blocks": "U8", "mlp.experts.down_proj_bias": "BF16"},
     "mlp.experts.down_proj_scales"),
])
def test_missing_companion_tensor_is_named(fmt, dtypes, missing):
    with pytest.raises(UserError, match=f"tensor {missing} is missing"):
        quantized_weights(fmt, dtypes)
    complete = {**dtypes, **dict.fromkeys(fmt.stored_names(fmt.base_of(missing, "F8_E4M3")),
                                          "F8_E4M3")}
    assert quantized_weights(fmt, complete) == [fmt.base_of(missing, "F8_E4M3")]


def test_relative_error_of_zero_weights():
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.zeros(3), torch.ones(3)) == math.inf
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == 0.2
