"""Quantized checkpoints end to end (issue 9, item 3): FP8 blocks (DeepSeek-V3, GLM) and
compressed-tensors INT4 experts (Kimi-K2-Thinking) read, reduced and written back in their
format (or in bf16 with --dtype bf16), the output loading in transformers."""

import json

import pytest
import torch
from checkpoints import load_all, logits_of, tree_digest
from cli_runs import assert_user_error, run
from family_models import CASES
from parity import (
    TOKENS,
    as_transformers_knows_it,
    assert_same_forward,
    member_weights,
    merge,
    our_forward,
    reduce,
    relative_error,
    same_bytes,
)
from quantized_models import (
    KIMI_INT4,
    block_dequantize,
    dense_copy,
    fp8_dense,
    save_fp8_model,
    save_int4_model,
)
from safetensors.torch import load_file, save_file

from hcconvert.io.quantization import Fp8Block, PackedInt4

FP8_CASES = ["deepseek_v3", "glm4_moe", "minimax_m2"]
BLOCK = (8, 8)  # divides every tiny dimension, as 128 divides DeepSeek-V3's


def fp8_logits(directory, tokens=TOKENS, hidden_states=False):
    """What transformers computes from an fp8 checkpoint it dequantizes on loading."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32,
        quantization_config=FineGrainedFP8Config(dequantize=True))
    with torch.no_grad():
        return model(tokens, output_hidden_states=hidden_states)


@pytest.mark.parametrize("name", FP8_CASES)
def test_fp8_forward_matches_transformers(tmp_path, name):
    """The streamed forward (the pipeline's and eval's) on an fp8 source computes what
    transformers computes from the same checkpoint, every quantized weight dequantized."""
    src = save_fp8_model(CASES[name], tmp_path / "src", BLOCK)
    reference = fp8_logits(src, hidden_states=True)
    states, logits = our_forward(src, TOKENS, torch.float32)
    assert_same_forward(states, logits, reference, rtol=1e-4, atol=1e-4)


def expert_names(case, prefix, count):
    return [prefix + template.format(e=e) for e in range(count) for template in case.experts]


def reference_experts(case, dense, record):
    """Each MoE layer's merged experts, rebuilt from the source's dequantized experts and
    hcconvert.json's groups (frequency-weighted, as HC-SMoE merges): full name -> weight."""
    merged = {}
    for entry in record["layers"]:
        prefix = f"model.layers.{entry['layer']}."
        counts = torch.tensor(entry["frequencies"], dtype=torch.float64)
        for template in case.experts:
            stacked = torch.stack([dense[prefix + template.format(e=e)]
                                   for e in range(record["experts_before"])])
            for c, group in enumerate(entry["groups"]):
                merged[prefix + template.format(e=c)] = merge(
                    stacked, group, member_weights(group, counts))
    return merged


@pytest.mark.parametrize("name", FP8_CASES)
def test_fp8_merge_writes_fp8_back(tmp_path, calib_text, name):
    """Merged experts come back as fp8 with fresh block scales, within fp8 precision of the
    reference merge and with the error hcconvert.json records; every other tensor is the
    source's bytes; the output loads in transformers with the expert count rewritten."""
    case = CASES[name]
    src = save_fp8_model(case, tmp_path / "src", BLOCK)
    out = tmp_path / "out"
    record = reduce(src, out, case.reduce_to, calib_text, method="hc-smoe")
    source, written = load_all(src), load_all(out)
    merged = reference_experts(case, fp8_dense(source, BLOCK), record)
    routers = {f"model.layers.{e['layer']}.{t}" for e in record["layers"]
               for t in (case.router, case.router_bias)}
    replaced = {n for n in source if ".experts." in n} | routers
    copied = set(written) - {n for base in merged for n in (base, base + "_scale_inv")} - routers
    assert copied == set(source) - replaced
    for tensor_name in copied:
        assert same_bytes(written[tensor_name], source[tensor_name]), tensor_name
    assert record["quantization"] == {"method": "fp8", "quantized_weights": len(
        [n for n in source if n.endswith("_scale_inv")]), "written_as": "fp8"}
    for entry in record["layers"]:
        prefix = f"model.layers.{entry['layer']}."
        errors = []
        for base in expert_names(case, prefix, case.reduce_to):
            assert written[base].dtype == torch.float8_e4m3fn
            restored = block_dequantize(written[base], written[base + "_scale_inv"], BLOCK)
            errors.append(relative_error(merged[base], restored))
        # Merging in hcconvert and here may round differently in the last bit.
        requantized = entry["requantization"]
        assert requantized["requantized"] + requantized["copied"] == len(errors)
        assert 0 < max(errors) < 2 ** -4
        assert requantized["error_max"] == pytest.approx(max(errors), rel=1e-3)
    config = json.loads((out / "config.json").read_text())
    assert config[case.experts_key] == case.reduce_to
    assert config["quantization_config"] == json.loads(
        (src / "config.json").read_text())["quantization_config"]
    # transformers reads our fp8 as it reads the source's: the dense copy computes the same.
    reference = dense_copy(out, tmp_path / "dense", lambda t: fp8_dense(t, BLOCK))
    torch.testing.assert_close(fp8_logits(out).logits, logits_of(reference, TOKENS))


def test_fp8_pruning_copies_kept_experts_as_stored(tmp_path, calib_text):
    """A kept expert is the source's bytes, scales included, though requantizing it would
    not give them back (the source's scales leave headroom below 448)."""
    case = CASES["deepseek_v3"]
    src = save_fp8_model(case, tmp_path / "src", BLOCK, divisor=400.0)
    record = reduce(src, tmp_path / "out", case.reduce_to, calib_text, method="prune")
    source, written = load_all(src), load_all(tmp_path / "out")
    requantized = Fp8Block(block=BLOCK).quantize(
        "w", block_dequantize(source["model.layers.1.mlp.experts.0.up_proj.weight"],
                              source["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"],
                              BLOCK))
    assert not same_bytes(requantized[".weight_scale_inv"],
                          source["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"])
    for entry in record["layers"]:
        prefix = f"model.layers.{entry['layer']}."
        assert entry["requantization"] == {"requantized": 0, "copied": 3 * case.reduce_to,
                                           "error_mean": 0.0, "error_max": 0.0}
        for c, (kept,) in enumerate(entry["groups"]):
            for template in case.experts:
                for suffix in ("", "_scale_inv"):
                    assert same_bytes(written[prefix + template.format(e=c) + suffix],
                                      source[prefix + template.format(e=kept) + suffix])


def test_fp8_dtype_bf16_writes_everything_dense(tmp_path, calib_text):
    """--dtype bf16: every quantized weight dequantized in bf16, no scales, no
    quantization_config; loads in stock transformers."""
    case = CASES["glm4_moe"]
    src = save_fp8_model(case, tmp_path / "src", BLOCK)
    out = tmp_path / "out"
    record = reduce(src, out, case.reduce_to, calib_text, dtype="bf16", method="hc-smoe")
    source, written = load_all(src), load_all(out)
    dense = fp8_dense(source, BLOCK)
    merged = reference_experts(case, dense, record)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert record["quantization"]["written_as"] == "bf16"
    assert not [n for n in written if n.endswith("_scale_inv")]
    for tensor_name, tensor in written.items():
        if tensor_name in merged:
            torch.testing.assert_close(tensor.float(), merged[tensor_name], rtol=0.01,
                                       atol=0.01)
        elif tensor_name + "_scale_inv" in source:
            assert torch.equal(tensor, dense[tensor_name].to(torch.bfloat16)), tensor_name
        elif ".experts." not in tensor_name and case.router not in tensor_name \
                and case.router_bias not in tensor_name:
            assert same_bytes(tensor, source[tensor_name]), tensor_name
    assert {t.dtype for n, t in written.items() if n in merged} == {torch.bfloat16}
    assert torch.isfinite(logits_of(out, TOKENS)).all()


def int4_dense(tensors: dict) -> dict:
    """compressed-tensors int4 weights dequantized (by hcconvert's codec, which
    test_quantization holds against compressed-tensors' own code); the rest as it is."""
    fmt, dense = PackedInt4(), {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_shape")):
            continue
        if name.endswith(".weight_packed"):
            base = name.removesuffix("_packed").removesuffix(".weight")
            parts = {suffix: tensors[base + suffix] for suffix in fmt.suffixes}
            dense[base + ".weight"] = fmt.dequantize(base, parts, torch.bfloat16)
        else:
            dense[name] = tensor
    return dense


@pytest.mark.parametrize("method", ["prune", "merge"])
def test_int4_experts_convert(tmp_path, calib_text, method):
    """Kimi-K2-Thinking's int4 experts: written back as int4 (kept experts as stored, merged
    ones requantized, the scale and shape tensors in the source's dtypes); the int4 output,
    dequantized, computes what the --dtype bf16 output computes, up to the recorded error."""
    src = save_int4_model(KIMI_INT4, tmp_path / "src")
    options = {"method": method if method == "prune" else "hc-smoe"}
    record = reduce(src, tmp_path / "int4", 6, calib_text, **options)
    reduce(src, tmp_path / "bf16", 6, calib_text, dtype="bf16", **options)
    source, int4, bf16 = (load_all(tmp_path / d) for d in ("src", "int4", "bf16"))
    for name in [n for n in int4 if n.endswith((".weight_scale", ".weight_shape"))]:
        assert int4[name].dtype == source[name.replace("experts.0.", "experts.1.")].dtype
    dense = int4_dense(int4)
    assert dense.keys() == bf16.keys()
    experts = [n for n in dense if ".experts." in n]
    errors = [relative_error(bf16[n], dense[n]) for n in experts]
    recorded = [entry["requantization"] for entry in record["layers"]]
    if method == "prune":
        assert all(r["requantized"] == 0 for r in recorded)
        assert max(errors) == 0
    else:
        # int4 in groups of 32: about 0.09 of the weight, as test_quantization measures.
        assert 0.02 < max(r["error_mean"] for r in recorded) < 0.12
        assert max(errors) == pytest.approx(max(r["error_max"] for r in recorded), rel=0.05)
    for name in dense.keys() - set(experts):
        assert same_bytes(bf16[name], dense[name]), name
    reference = dense_copy(tmp_path / "int4", tmp_path / "dense", int4_dense)
    as_transformers_knows_it(KIMI_INT4, reference, reference)
    loadable = as_transformers_knows_it(KIMI_INT4, tmp_path / "bf16", tmp_path / "loadable")
    loose = 0.02 if method == "prune" else 0.5
    torch.testing.assert_close(logits_of(reference, TOKENS), logits_of(loadable, TOKENS),
                               rtol=loose, atol=loose)


def assert_refused(result, fragment, out, src, digest):
    assert_user_error(result, fragment)
    assert not out.exists() and tree_digest(src) == digest


def drop_tensor(src, name):
    """Remove one tensor from its shard and the index."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("change,fragment", [
    (lambda src: drop_tensor(src, "model.layers.1.self_attn.o_proj.weight_scale_inv"),
     "tensor model.layers.1.self_attn.o_proj.weight_scale_inv is missing: "
     "model.layers.1.self_attn.o_proj.weight is stored as fp8"),
    (lambda src: drop_tensor(src, "model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"),
     "tensor model.layers.2.mlp.experts.3.down_proj.weight_scale_inv is missing"),
    (lambda src: set_config(src, {"quant_method": "gptq", "bits": 4}),
     "quantization method 'gptq' is not supported"),
    (lambda src: set_config(src, None),
     "is stored as F8_E4M3, but config.json has no quantization_config"),
    (lambda src: set_config(src, {**fp8_quantization(src), "weight_block_size": [8, 16]}),
     "weight_block_size [8, 16] blocks needs"),
], ids=["attention-scale", "expert-scale", "gptq", "no-config", "wrong-grid"])
def test_bad_quantized_input_is_one_line(tmp_path, change, fragment):
    src = save_fp8_model(CASES["deepseek_v3"], tmp_path / "src", BLOCK)
    change(src)
    digest, out = tree_digest(src), tmp_path / "out"
    assert_refused(run(src, "--experts", 4, "--out", out, "--calib", "x.txt"), fragment, out,
                   src, digest)


def fp8_quantization(src):
    return json.loads((src / "config.json").read_text())["quantization_config"]


def set_config(src, settings):
    from quantized_models import set_quantization_config

    set_quantization_config(src, settings)


def test_block_that_does_not_divide_is_refused_on_write_only(tmp_path, calib_text):
    """Blocks of 16 leave the 24-row experts with partial blocks: readable (as DeepSeek's
    576-row kv_a_proj_with_mqa), but transformers loads fp8 in whole blocks only, so the
    merged experts cannot be written as fp8; as bf16 they can."""
    src = save_fp8_model(CASES["deepseek_v3"], tmp_path / "src", (16, 16))
    digest, out = tree_digest(src), tmp_path / "out"
    args = [src, "--experts", 4, "--out", out, "--calib", calib_text]
    assert_refused(run(*args), "weight_block_size [16, 16] does not divide "
                   "model.layers.1.mlp.experts.0.gate_proj.weight [24, 32]", out, src, digest)
    result = run(*args, "--dtype", "bf16", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "quantized     fp8" in result.output and "bf16 (dequantized)" in result.output


def test_dtype_bf16_needs_a_quantized_source(tmp_path):
    from family_models import save_family_model

    src = save_family_model(CASES["deepseek_v3"], tmp_path / "src")
    digest, out = tree_digest(src), tmp_path / "out"
    assert_refused(run(src, "--experts", 4, "--out", out, "--dtype", "bf16", "--calib", "x"),
                   "--dtype bf16 writes quantized weights dequantized", out, src, digest)


def test_inspect_and_dry_run_describe_an_fp8_source(tmp_path, calib_text):
    src = save_fp8_model(CASES["deepseek_v3"], tmp_path / "src", BLOCK)
    inspected = run("inspect", src)
    assert inspected.exit_code == 0, inspected.output
    assert "family        deepseek_v3 (supported)" in inspected.output
    assert "F8_E4M3" in inspected.output
    # 72: the dense layer 0 has 5 attention and 3 MLP projections, layers 1-2 add 3 shared
    # and 8 x 3 routed-expert ones each.
    planned = run(src, "--experts", 4, "--calib", calib_text, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "quantized     fp8, 72 quantized weights -> fp8 (merged experts requantized" \
        in planned.output
