"""GPT-OSS as the Hub ships it (issue 10): expert matrices in MXFP4 (`*_blocks` / `*_scales`
of the transposed weight), biases and everything else in bf16. Read through the dequantizing
view, merged, written back in MXFP4 (or bf16 with --dtype bf16), loading in transformers."""

import dataclasses
import json

import pytest
import torch
from checkpoints import load_all, logits_of
from family_models import CASES
from parity import (
    TOKENS,
    assert_same_forward,
    member_weights,
    merge,
    our_forward,
    reduce,
    relative_error,
    same_bytes,
)
from quantized_models import MXFP4_WEIGHTS, save_mxfp4_model

from hcconvert.io.quantization import Mxfp4

# F = 64 and H = 32: multiples of the 32-value block, and gate_up [E, H, 2F], down [E, F, H]
# differ in shape from their stored transposes, so an orientation slip cannot go unnoticed.
CASE = dataclasses.replace(CASES["gpt_oss"], config={**CASES["gpt_oss"].config,
                                                     "intermediate_size": 64})
BIASES = ("mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias")
LAYERS = range(3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_mxfp4_model(CASE, tmp_path_factory.mktemp("mxfp4") / "src")


def transformers_mxfp4(directory, hidden_states=False):
    """What transformers computes from an MXFP4 checkpoint it dequantizes on loading (the
    CPU path, without the triton kernels)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        return model(TOKENS, output_hidden_states=hidden_states)


def dequantized(tensors: dict) -> dict:
    """Each MXFP4 weight (base name) dequantized to float32 by hcconvert's codec, which
    test_quantization holds equal to transformers' convert_moe_packed_tensors."""
    return {base: Mxfp4().dequantize(base, {s: tensors[base + s] for s in ("_blocks", "_scales")})
            for base in {n.removesuffix("_blocks") for n in tensors if n.endswith("_blocks")}}


def test_forward_matches_transformers(source):
    reference = transformers_mxfp4(source, hidden_states=True)
    states, logits = our_forward(source, TOKENS, torch.float32)
    assert_same_forward(states, logits, reference, rtol=1e-4, atol=1e-4)


def reference_experts(source: dict, record: dict, dense: dict) -> dict:
    """Each layer's merged expert matrices (dense, float32) and biases, rebuilt from the
    source and hcconvert.json's groups: full name -> tensor."""
    merged = {}
    for entry in record["layers"]:
        prefix = f"model.layers.{entry['layer']}."
        counts = torch.tensor(entry["frequencies"], dtype=torch.float64)
        weights = [member_weights(g, counts) for g in entry["groups"]]
        for name in (*MXFP4_WEIGHTS, *BIASES):
            stacked = dense.get(prefix + name, source.get(prefix + name))
            merged[prefix + name] = torch.stack(
                [merge(stacked, g, w) for g, w in zip(entry["groups"], weights, strict=True)])
    return merged


def test_merge_writes_mxfp4_back(source, tmp_path, calib_text):
    """Merged expert matrices come back as MXFP4 with fresh scales, within e2m1 precision of
    the reference merge and with the recorded error; the biases in bf16; every other tensor
    the source's bytes; transformers loads the output as it loads the Hub's."""
    out = tmp_path / "out"
    record = reduce(source, out, CASE.reduce_to, calib_text, method="hc-smoe")
    src, written = load_all(source), load_all(out)
    merged = reference_experts(src, record, dequantized(src))
    reduced = {f"model.layers.{layer}.{name}" for layer in LAYERS
               for name in (CASE.router, CASE.router_bias, *BIASES)}
    replaced = reduced | {base + suffix for base in merged for suffix in ("_blocks", "_scales")}
    assert set(written) == set(src)
    for name in set(src) - replaced:
        assert same_bytes(written[name], src[name]), name
    restored = dequantized(written)
    for entry in record["layers"]:
        errors = []
        for name in MXFP4_WEIGHTS:
            base = f"model.layers.{entry['layer']}.{name}"
            assert written[base + "_blocks"].dtype == torch.uint8
            assert restored[base].shape == merged[base].shape
            errors.append(relative_error(merged[base], restored[base]))
        for name in BIASES:
            bias = f"model.layers.{entry['layer']}.{name}"
            assert written[bias].dtype == torch.bfloat16
            torch.testing.assert_close(written[bias].float(), merged[bias].float(), rtol=0.01,
                                       atol=0.01)
        # e2m1: about 0.1 of a Gaussian weight (test_quantization); fused: never copied.
        assert entry["requantization"]["requantized"] == 2
        assert entry["requantization"]["copied"] == 0
        assert 0.02 < max(errors) < 0.2
        assert entry["requantization"]["error_max"] == pytest.approx(max(errors), rel=0.05)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == CASE.reduce_to
    assert config["quantization_config"] == json.loads(
        (source / "config.json").read_text())["quantization_config"]
    assert record["quantization"] == {"method": "mxfp4", "quantized_weights": 6,
                                      "written_as": "mxfp4"}
    # transformers reads our MXFP4 as the streamed forward does.
    _, ours = our_forward(out, TOKENS, torch.float32)
    torch.testing.assert_close(transformers_mxfp4(out).logits, ours, rtol=1e-4, atol=1e-4)


def test_dtype_bf16_writes_experts_dense(source, tmp_path, calib_text):
    """--dtype bf16: the merged experts as GPT-OSS's bf16 parameters (gate_up [R, H, 2F]), no
    blocks or scales, no quantization_config; loads in stock transformers."""
    out = tmp_path / "out"
    record = reduce(source, out, CASE.reduce_to, calib_text, dtype="bf16", method="hc-smoe")
    src, written = load_all(source), load_all(out)
    merged = reference_experts(src, record, dequantized(src))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not [n for n in written if n.endswith(("_blocks", "_scales"))]
    for name, tensor in merged.items():
        assert written[name].dtype == torch.bfloat16
        torch.testing.assert_close(written[name].float(), tensor.float(), rtol=0.01, atol=0.01)
    assert written["model.layers.0.mlp.experts.gate_up_proj"].shape == (
        CASE.reduce_to, 32, 2 * CASE.config["intermediate_size"])
    _, ours = our_forward(out, TOKENS, torch.float32)
    torch.testing.assert_close(logits_of(out, TOKENS), ours, rtol=1e-4, atol=1e-4)
