"""The references quantized storage is held against, written here independently of hcconvert's
codecs: the Hub's quantization_config of each format, compressed-tensors' pack-quantized int4
and triton_kernels' mxfp4 encoder."""

import math

import torch

# quantization_config as the Hub's config.json files write them.
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
               "weight_block_size": [128, 128]}
KIMI_K2_THINKING = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                    "group_size": 32, "num_bits": 4, "observer": "minmax",
                    "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors",
    "quantization_status": "compressed"}
GPT_OSS = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                      "model.embed_tokens", "lm_head"],
           "quant_method": "mxfp4"}


# --- compressed-tensors pack-quantized int4 ---------------------------------------------------
# The reference below restates compressed-tensors (not installed here) from its source:
# compressors/quantized_compressors/pack_quantized.py (pack_to_int32, unpack_from_int32),
# quantization/utils/helpers.py (calculate_qparams: symmetric scale = amax / (15 / 2), zero
# scales -> eps) and quantization/lifecycle/forward.py (_quantize: clamp then round; _dequantize:
# x_q.to(scale.dtype) * scale).

def reference_pack(value, num_bits=4):
    offset = 1 << (num_bits - 1)
    value = (value + offset).to(torch.uint8)
    rows, cols = value.shape
    pack_factor = 32 // num_bits
    padded = math.ceil(cols / pack_factor) * pack_factor
    value = torch.nn.functional.pad(value, (0, padded - cols))
    reshaped = value.view(rows, padded // pack_factor, pack_factor).to(torch.int32)
    shifts = torch.arange(pack_factor, dtype=torch.int32) * num_bits
    return (reshaped << shifts).sum(dim=2, dtype=torch.int32)


def reference_unpack(value, shape, num_bits=4):
    pack_factor = 32 // num_bits
    mask = (1 << num_bits) - 1
    unpacked = torch.zeros((value.shape[0], value.shape[1] * pack_factor), dtype=torch.int32)
    for i in range(pack_factor):
        unpacked[:, i::pack_factor] = (value >> (num_bits * i)) & mask
    unpacked = unpacked[:, :shape[1]]
    return (unpacked - pow(2, num_bits) // 2).to(torch.int8)


def reference_quantize(weight, group_size, scale_dtype=torch.bfloat16):
    groups = weight.unflatten(-1, (-1, group_size))
    amax = torch.max(groups.amin(-1).abs(), groups.amax(-1).abs())
    scale = (amax / 7.5).to(scale_dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps,
                                                 dtype=scale_dtype), scale)
    q = torch.round(torch.clamp(groups / scale.float().unsqueeze(-1), -8, 7))
    return q.flatten(-2).to(torch.int8), scale


def reference_dequantize(q, scale, group_size):
    groups = q.unflatten(-1, (-1, group_size)).to(scale.dtype)
    return (groups * scale.unsqueeze(-1)).flatten(-2)


# --- mxfp4 ------------------------------------------------------------------------------------

def reference_downcast_mxfp4(weight):
    """triton_kernels' downcast_to_mxfp_torch (numerics_details/mxfp.py) for e2m1 along the last
    axis, restated: scale = amax / 6 rounded up to a power of two on its float32 bits, values
    rounded to e2m1 on their bits, two codes per byte, low nibble first."""
    groups = weight.float().unflatten(-1, (-1, 32))
    amax = groups.abs().amax(-1, keepdim=True)
    ds_int = (amax / 6.0).view(torch.int32)
    ds_rounded = (ds_int + 0x007FFFFF) & 0x7F800000
    dequant_scale = ds_rounded.view(torch.float32)
    quant_scale = torch.where(dequant_scale == 0, torch.tensor(0.0), 1.0 / dequant_scale)
    q_int = (groups * quant_scale).flatten(-2).contiguous().view(torch.int32)

    def shift(x, n):
        return (x >> n) & ((1 << (32 - n)) - 1)

    signs = q_int & -0x80000000
    exponents = shift(q_int, 23) & 0xFF
    mantissas = q_int & 0x7FFFFF
    mantissas = torch.where(exponents < 127, (0x400000 | shift(mantissas, 1)) >> (126 - exponents),
                            mantissas)
    exponents = torch.maximum(exponents, torch.tensor(126)) - 126
    e2m1 = torch.minimum(shift(((exponents << 2) | shift(mantissas, 21)) + 1, 1), torch.tensor(7))
    e2m1 = (shift(signs, 28) | e2m1).to(torch.uint8)
    packed = e2m1[..., 0::2] | (e2m1[..., 1::2] << 4)
    return packed.unflatten(-1, (-1, 16)), shift(ds_rounded, 23).squeeze(-1).to(torch.uint8)
