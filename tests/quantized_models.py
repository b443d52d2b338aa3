"""Tiny checkpoints in the Hub's quantized layouts, made from tiny bf16 family models with
quantizers written here and in reference_codecs, independently of hcconvert's codecs:

- fp8 as DeepSeek-V3/R1 and GLM's FP8 repos: every Linear weight F8_E4M3 with a float32
  `weight_scale_inv` per block; norms, embeddings, LM head and the router gate stay bf16.
- compressed-tensors pack-quantized int4 as Kimi-K2-Thinking: routed experts only (its
  ignore list keeps attention, shared experts, dense MLPs and the LM head in bf16).
- mxfp4 as openai/gpt-oss-20b and -120b: the fused expert matrices as `*_blocks` [E, R, C/32,
  16] and `*_scales` [E, R, C/32] of the transposed weight (gate_up_proj [E, H, 2F] stored
  as [E, 2F, H/32, 16]); their biases, attention, router, embeddings and LM head in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from checkpoints import load_all
from family_models import CASES, Case, save_family_model
from reference_codecs import (
    GPT_OSS,
    KIMI_K2_THINKING,
    reference_downcast_mxfp4,
    reference_pack,
    reference_quantize,
)
from safetensors.torch import load_file, save_file

# Not quantized on the Hub: norms, embeddings, LM head, routers.
FP8_KEPT = ("norm", "embed_tokens", "lm_head", "mlp.gate.weight", "block_sparse_moe.gate.weight")
FP8_MAX = 448.0
# How a family's Hub config spells its fp8 quantization_config, where it differs from
# DeepSeek-V3's (MiniMax-M2's official config.json).
HUB_FP8_SETTINGS = {"minimax_m2": {"fmt": "float8_e4m3fn", "modules_to_not_convert": [
    "gate", "e_score_correction_bias", "lm_head"]}}


def fp8_config(block: tuple[int, int], model_type: str = "deepseek_v3") -> dict:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(block), **HUB_FP8_SETTINGS.get(model_type, {})}


def block_fp8(weight: torch.Tensor, block: tuple[int, int], divisor: float):
    """(F8_E4M3 values, float32 scales) of a 2-D weight, scale = block amax / divisor; edge
    blocks may be partial, as DeepSeek-V3's kv_a_proj_with_mqa."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / divisor
    values = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return values.to(torch.float8_e4m3fn), scale


def block_dequantize(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]):
    """The float32 weight of fp8 values and their block scales."""
    rows, cols = values.shape
    spread = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return values.float() * spread[:rows, :cols]


def is_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not any(k in name for k in FP8_KEPT)


def save_fp8_model(case: Case, directory: Path, block=(8, 8), divisor=FP8_MAX) -> Path:
    """The case's model in bf16, its Linear weights stored as fp8 blocks. divisor: the block
    amax lands on this code (448 as DeepSeek's quantizer; less leaves headroom, so that
    requantizing with 448 would not give the stored bytes back)."""
    save_family_model(case, directory, dtype=torch.bfloat16, hub_style=True)

    def quantize(name, tensor):
        if not is_fp8_linear(name, tensor):
            return {name: tensor}
        values, scale = block_fp8(tensor, block, divisor)
        return {name: values, name + "_scale_inv": scale}
    rewrite_shards(directory, quantize)
    set_quantization_config(directory, fp8_config(block, case.model_type))
    return directory


# Kimi-K2-Thinking at small size: experts of 32 columns both ways, so groups of 32 fit.
KIMI_INT4 = CASES["kimi_k2"].__class__(**{**CASES["kimi_k2"].__dict__, "config": {
    **CASES["kimi_k2"].config, "moe_intermediate_size": 32}})


def save_int4_model(case: Case, directory: Path, group: int = 32) -> Path:
    """The case's model in bf16 with its routed experts as pack-quantized int4 groups (the
    shape tensor as int64, to show the written dtypes follow the source's)."""
    save_family_model(case, directory, dtype=torch.bfloat16, hub_style=True)

    def quantize(name, tensor):
        if ".experts." not in name or not name.endswith(".weight"):
            return {name: tensor}
        q, scale = reference_quantize(tensor.float(), group)
        base = name.removesuffix(".weight")
        return {base + ".weight_packed": reference_pack(q), base + ".weight_scale": scale,
                base + ".weight_shape": torch.tensor(tensor.shape, dtype=torch.int64)}
    rewrite_shards(directory, quantize)
    groups = KIMI_K2_THINKING["config_groups"]["group_0"]
    settings = {**KIMI_K2_THINKING, "config_groups": {"group_0": {
        **groups, "weights": {**groups["weights"], "group_size": group}}}}
    set_quantization_config(directory, settings)
    return directory


MXFP4_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def save_mxfp4_model(case: Case, directory: Path) -> Path:
    """The case's GPT-OSS model in bf16 with its expert matrices in mxfp4, as the Hub's."""
    save_family_model(case, directory, dtype=torch.bfloat16, hub_style=True)

    def quantize(name, tensor):
        if not name.endswith(MXFP4_WEIGHTS):
            return {name: tensor}
        # transformers' experts hold x @ W; the Hub stores W's transpose, blocked along H.
        blocks, scales = reference_downcast_mxfp4(tensor.float().transpose(1, 2))
        return {name + "_blocks": blocks, name + "_scales": scales}
    rewrite_shards(directory, quantize)
    set_quantization_config(directory, GPT_OSS)
    return directory


def rewrite_shards(directory: Path, transform) -> None:
    """Replace each tensor by the tensors transform(name, tensor) gives, in its shard."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(shard).items():
            tensors.update(transform(name, tensor))
        save_file(tensors, str(shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    index_path.write_text(json.dumps({**index, "weight_map": weight_map}))


def set_quantization_config(directory: Path, settings: dict | None) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    if settings is not None:
        config["quantization_config"] = settings
    path.write_text(json.dumps(config, indent=2))


def dense_copy(directory: Path, copy_to: Path, dequantize) -> Path:
    """A copy of a checkpoint with every tensor dequantize(tensors) gives (all tensors ->
    dense tensors), config.json without its quantization_config: what a quantized checkpoint
    computes, for stock transformers."""
    copy_to.mkdir()
    (copy_to / "config.json").write_bytes((directory / "config.json").read_bytes())
    set_quantization_config(copy_to, None)
    save_file(dequantize(load_all(directory)), str(copy_to / "model.safetensors"),
              metadata={"format": "pt"})
    return copy_to


def fp8_dense(tensors: dict, block) -> dict:
    """fp8 blocks dequantized to float32; the other tensors as they are."""
    dense = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        dense[name] = tensor if scale is None else block_dequantize(tensor, scale, block)
    return dense
