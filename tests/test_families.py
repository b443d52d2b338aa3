"""Every supported family on tiny random models saved by transformers 5.

(a) our layer-by-layer forward equals transformers' hidden states and logits (fp32 tight,
    bf16 loose); (b) a conversion's output loads in transformers and equals a reference merge
    rebuilt from hcconvert.json (parity.py); (c) config.json changes only the expert count (and
    top-k where it must drop); (d) fused on-disk experts stay fused, with R experts.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from checkpoints import load_all, logits_of, rewrite_tensor
from family_models import CASES, Case, save_family_model
from parity import (
    TOKENS,
    as_transformers_knows_it,
    assert_same_forward,
    our_forward,
    reference_merge,
    router_picks,
    transformers_forward,
)
from quantized_models import KIMI_INT4, save_int4_model
from safetensors.torch import save_file

from hcconvert.errors import UserError
from hcconvert.methods import layerfit
from hcconvert.model import experts as experts_module
from hcconvert.model.families import FAMILIES
from hcconvert.model.spec import open_source
from hcconvert.model.tokenizer import embedding_rows
from hcconvert.pipeline.checks import plan_for
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

# bf16: both sides round every matmul, so agreement is to bf16's ~2-3 significant digits.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=0.05, atol=0.05)}


def test_every_family_has_a_case():
    model_types = {case.hub_model_type or case.model_type for case in CASES.values()}
    # Kimi-K2.5's wrapper: test_kimi_k25_converts_as_its_text_model (transformers 5.24 saves
    # its text layers under other names than the Hub's).
    assert model_types | {"kimi_k25"} == set(FAMILIES)


@pytest.mark.parametrize("dtype,hub_style", [(torch.float32, False), (torch.float32, True),
                                             (torch.bfloat16, True)],
                         ids=["fp32", "fp32-hub-config", "bf16-hub-config"])
@pytest.mark.parametrize("name", list(CASES))
def test_layer_forward_matches_transformers(tmp_path, monkeypatch, name, dtype, hub_style):
    # transformers' own half-precision arithmetic (products rounded before the activation):
    # the test is of the family's wiring; the fused products are tested in test_single_pass.
    monkeypatch.setattr(experts_module, "_fused_products_available", lambda dtype: False)
    src = save_family_model(CASES[name], tmp_path / "m", dtype=dtype, hub_style=hub_style)
    loadable = as_transformers_knows_it(CASES[name], src, tmp_path / "loadable")
    reference = transformers_forward(CASES[name], loadable, TOKENS, dtype)
    teacher = reference.hidden_states if dtype == torch.bfloat16 else None
    states, logits = our_forward(src, TOKENS, dtype, teacher)
    assert_same_forward(states, logits, reference, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype,hub_style,router", [
    (torch.float32, True, "freq-avg"),  # the Hub's config spelling
    (torch.bfloat16, False, "dominant"),  # transformers 5's spelling; merge in fp32, cast back
], ids=["fp32-hub-config-freq-avg", "bf16-dominant"])
@pytest.mark.parametrize("name", list(CASES))
def test_conversion_equals_reference_merge(tmp_path, calib_text, name, dtype, hub_style, router):
    case = CASES[name]
    src = save_family_model(case, tmp_path / "src", dtype=dtype, hub_style=hub_style)
    out = tmp_path / "out"
    options = ConvertOptions(method="hc-smoe",
                             experts=case.reduce_to, calib=str(calib_text), calib_samples=4,
                             seq_len=64, router=router, max_shard_size=50_000)
    convert(str(src), out, options, progress=False)
    if router == "freq-avg":  # once per family: the routing the conversion recorded
        assert_frequencies_are_transformers_router(case, src, out, options)

    written, expected = load_all(out), reference_merge(case, src, out, router)
    assert written.keys() == expected.keys()
    for tensor_name, tensor in expected.items():
        assert written[tensor_name].dtype == tensor.dtype, tensor_name
        torch.testing.assert_close(written[tensor_name], tensor, msg=tensor_name)
    # The output loads in transformers and computes what the reference weights compute.
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_bytes((out / "config.json").read_bytes())
    save_file(expected, str(reference / "model.safetensors"), metadata={"format": "pt"})
    loadable = as_transformers_knows_it(case, out, tmp_path / "loadable")
    as_transformers_knows_it(case, reference, reference)
    torch.testing.assert_close(transformers_forward(case, loadable, TOKENS, torch.float32).logits,
                               transformers_forward(case, reference, TOKENS, torch.float32).logits)
    assert_config_changes_only_counts(case, src, out)
    if case.grouped or case.config.get("topk_method") == "group_limited_greedy":
        assert_groups_within_routing_groups(case, out)


def assert_frequencies_are_transformers_router(case: Case, src, out, options):
    """hcconvert.json's frequencies are what transformers' own routers pick on the same
    calibration tokens, run through the whole stock model at once."""
    from hcconvert.io.source import Checkpoint
    from hcconvert.pipeline.calibration import load_calibration

    record = json.loads((out / "hcconvert.json").read_text())
    tokens = load_calibration(Checkpoint(src), options.calib, options.calib_samples,
                              options.seq_len, options.seed)
    model = case.load(as_transformers_knows_it(case, src, src.parent / "loadable-src"),
                      dtype=torch.float32)
    picks = router_picks(model, tokens, [entry["layer"] for entry in record["layers"]])
    for entry in record["layers"]:
        counts = torch.bincount(picks[entry["layer"]].flatten(),
                                minlength=record["experts_before"])
        assert counts.tolist() == entry["frequencies"], entry["layer"]


def assert_config_changes_only_counts(case: Case, src, out):
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    if case.vision is not None:  # the counts are in the text config; nothing else changes
        assert {k: v for k, v in before.items() if k != "text_config"} == \
            {k: v for k, v in after.items() if k != "text_config"}
        before, after = before["text_config"], after["text_config"]
    experts_key = case.hub_renames.get(case.experts_key, case.experts_key)
    if experts_key not in before:
        experts_key = case.experts_key
    top_k_key = FAMILIES[case.hub_model_type or case.model_type].top_k_key
    top_k = before[top_k_key]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert after[experts_key] == case.reduce_to
    if case.reduce_to < top_k:  # only then may top-k drop, and only to R
        assert after[top_k_key] == case.reduce_to
        assert changed == {experts_key, top_k_key}
    else:
        assert changed == {experts_key}


def assert_groups_within_routing_groups(case: Case, out):
    """Group-limited routing: merged expert c comes from routing group c // (R / n_group)."""
    record = json.loads((out / "hcconvert.json").read_text())
    # Kimi-Linear's and Ling-2.5's spelling
    n_group = case.config.get("n_group") or case.config["num_expert_group"]
    size, kept = record["experts_before"] // n_group, case.reduce_to // n_group
    for entry in record["layers"]:
        for c, group in enumerate(entry["groups"]):
            assert {e // size for e in group} == {c // kept}, (entry["layer"], group)


def test_fused_experts_stay_fused(tmp_path, calib_text):
    case = CASES["granitemoe"]
    src = save_family_model(case, tmp_path / "src")
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(method="hc-smoe",
                                          experts=3, calib=str(calib_text), calib_samples=2,
                                          seq_len=32, router="dominant"), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    written = load_all(out)
    config = json.loads((src / "config.json").read_text())
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        assert sorted(k for k in index if k.startswith(prefix)) == [
            prefix + "input_linear.weight", prefix + "output_linear.weight",
            prefix + "router.layer.weight"]
        assert written[prefix + "input_linear.weight"].shape == (3, 2 * ffn, hidden)
        assert written[prefix + "output_linear.weight"].shape == (3, hidden, ffn)
        assert written[prefix + "router.layer.weight"].shape == (3, hidden)


def test_mixed_layouts_are_written_as_read(tmp_path, calib_text):
    """Qwen3.5 with layer 0 fused (as the Hub) and layers 1-2 per expert (as re-saves): each
    layer is reduced in its own layout, equal to the reference merge, and every tensor
    outside the text layers (the vision tower) is copied bit for bit."""
    case = CASES["qwen3_5_moe"]
    src = save_family_model(case, tmp_path / "src", fused_layers=[0])
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(method="hc-smoe", experts=3, calib=str(calib_text),
                                          calib_samples=2, seq_len=32, router="freq-avg"),
            progress=False)
    written, source = load_all(out), load_all(src)
    gate_up, down = case.experts
    assert written[case.layer_prefix(0) + gate_up].shape[0] == 3
    assert case.layer_prefix(0) + "mlp.experts.0.gate_proj.weight" not in written
    for layer in (1, 2):
        prefix = case.layer_prefix(layer)
        assert prefix + gate_up not in written
        assert {n for n in written if n.startswith(prefix + "mlp.experts.")} == {
            prefix + t.format(e=e) for t in case.saved_per_expert for e in range(3)}
    expected = reference_merge(case, src, out, "freq-avg")
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, msg=name)
    outside = [n for n in source if not n.startswith(case.text_prefix + "layers.")]
    assert any(n.startswith("model.visual.") for n in outside)
    for name in outside:
        assert written[name].dtype == source[name].dtype and torch.equal(written[name],
                                                                         source[name]), name


@pytest.mark.parametrize("name,tensor,change,fragment", [
    ("granitemoe", "model.layers.1.block_sparse_moe.input_linear.weight",
     lambda t: t[:, :-1].contiguous(),
     r"model.layers.1.block_sparse_moe.input_linear.weight has shape \[6, 47, 32\], "
     r"expected \[6, 48, 32\]"),
    ("granitemoe", "model.layers.2.block_sparse_moe.output_linear.weight",
     lambda t: None, "model.layers.2.block_sparse_moe.output_linear.weight is missing"),
    ("qwen2_moe", "model.layers.2.mlp.experts.3.down_proj.weight",
     lambda t: t.to(torch.bfloat16), "model.layers.2.mlp.experts.3.down_proj.weight is BF16"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight",
     lambda t: None, "model.layers.0.mlp.shared_expert_gate.weight is missing"),
    ("deepseek_v2", "model.layers.1.self_attn.kv_a_layernorm.weight",
     lambda t: None, "model.layers.1.self_attn.kv_a_layernorm.weight is missing"),
    # Tensors transformers joins on loading are checked as joined.
    ("kimi_linear", "model.layers.0.self_attn.k_conv1d.weight", lambda t: t[:-1].contiguous(),
     r"model.layers.0.self_attn.k_conv1d.weight.* make self_attn.conv1d.weight of shape "
     r"\[47, 1, 4\], expected \[48, 1, 4\]"),
])
def test_bad_tensors_are_named(tmp_path, name, tensor, change, fragment):
    src = save_family_model(CASES[name], tmp_path / "src")
    rewrite_tensor(src, tensor, change)
    ckpt, spec = open_source(str(src))
    with pytest.raises(UserError, match=fragment):
        plan_for(ckpt, spec, ConvertOptions(experts=CASES[name].reduce_to))[1]


def test_unknown_moe_tensor_is_refused(tmp_path):
    """A per-expert tensor the family does not describe (here a router bias) must not be
    copied with E rows into an R-expert model."""
    src = save_family_model(CASES["olmoe"], tmp_path / "src")
    rewrite_tensor(src, "model.layers.0.mlp.gate.weight", lambda t: torch.zeros(t.shape[0]),
                   new_name="model.layers.0.mlp.gate.bias")
    ckpt, spec = open_source(str(src))
    with pytest.raises(UserError, match="model.layers.0.mlp.gate.bias is not part of a olmoe"):
        plan_for(ckpt, spec, ConvertOptions(experts=4))[1]


def test_experts_outside_the_layers_are_refused(tmp_path):
    """An MTP layer the family does not place (K-EXAONE's mtp.*), with routed experts, would
    be copied with E experts into an R-expert checkpoint."""
    src = save_family_model(CASES["exaone_moe"], tmp_path / "src")
    stray = "mtp.layers.0.mlp.experts.0.gate_proj.weight"
    rewrite_tensor(src, "model.layers.1.mlp.experts.0.gate_proj.weight", lambda t: t.clone(),
                   new_name=stray)
    ckpt, spec = open_source(str(src))
    with pytest.raises(UserError, match=f"tensor {stray} holds routed experts outside the "
                                        "decoder layers hcconvert reduces for exaone_moe"):
        plan_for(ckpt, spec, ConvertOptions(experts=4))


def test_latent_experts_are_refused(tmp_path):
    """Nemotron-H's latent MoE: the experts see a projection of what the router sees."""
    src = save_family_model(CASES["nemotron_h"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "moe_latent_size": 16}))
    with pytest.raises(UserError, match="moe_latent_size=16: the routed experts work on a "
                                        "latent projection"):
        open_source(str(src))


def test_shared_keys_and_values_are_refused(tmp_path):
    """Mistral-Large-4 with layers reusing an earlier layer's keys and values."""
    src = save_family_model(CASES["mistral_large4"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["kv_source_layers"] = [0, 0, 2]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="kv_source_layers: layers reuse the keys and values"):
        open_source(str(src))


def test_sparsemixer_keeps_two_experts(tmp_path):
    """Phi-3.5-MoE's sparsemixer picks two experts whatever top-k says: one would be NaN."""
    src = save_family_model(CASES["phimoe"], tmp_path / "src")
    ckpt, spec = open_source(str(src))
    with pytest.raises(UserError, match="phimoe's router always picks 2 experts"):
        plan_for(ckpt, spec, ConvertOptions(experts=1))[1]
    assert plan_for(ckpt, spec, ConvertOptions(experts=2))[1].top_k_out == 2


@pytest.mark.parametrize("experts", [3, 6])
def test_group_limited_routing_needs_whole_groups(tmp_path, experts):
    src = save_family_model(CASES["deepseek_v2"], tmp_path / "src")
    ckpt, spec = open_source(str(src))
    with pytest.raises(UserError, match=r"n_group=4, topk_group=2, top-2\) needs one of: 4$"):
        plan_for(ckpt, spec, ConvertOptions(experts=experts))[1]


INSPECTED = {  # case -> (MoE layers, expert line, layout)
    "qwen2_moe": ("MoE: 0,2", "6 routed, top-2, shared expert: yes (sigmoid-gated)", "per-expert"),
    "qwen3_moe": ("MoE: 1-2", "6 routed, top-2, shared expert: no", "per-expert"),
    "olmoe": ("MoE: 0-2", "8 routed, top-4, shared expert: no", "per-expert"),
    "deepseek_v2": ("MoE: 1-2", "8 routed, top-2, shared expert: yes", "per-expert"),
    "granitemoe": ("MoE: 0-2", "6 routed, top-2, shared expert: no", "fused"),
    "qwen3_5_moe": ("MoE: 0-2", "6 routed, top-2, shared expert: yes (sigmoid-gated)", "fused"),
    "gpt_oss": ("MoE: 0-2", "6 routed, top-2, shared expert: no", "fused tensors, transposed"),
    "llama4": ("MoE: 1,3", "6 routed, top-1, shared expert: yes", "fused tensors, transposed"),
    "mistral4": ("MoE: 1-2", "8 routed, top-2, shared expert: yes", "fused tensors"),
}


@pytest.mark.parametrize("name", list(INSPECTED))
def test_inspect_describes_each_family(tmp_path, name):
    from click.testing import CliRunner

    from hcconvert.cli.main import main

    src = save_family_model(CASES[name], tmp_path / "src", hub_style=True)
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0, result.output
    moe_layers, experts, layout = INSPECTED[name]
    assert f"family        {CASES[name].model_type} (supported)" in result.output
    for fragment in (moe_layers, experts, f"layout        {layout}", "F32"):
        assert fragment in result.output


@pytest.mark.parametrize("name", [name for name in CASES if name not in INSPECTED])
def test_inspect_supports_every_family(tmp_path, name):
    """inspect reads every family's checkpoint as supported, with its layout and MoE layers
    (the cases in INSPECTED say more)."""
    from click.testing import CliRunner

    from hcconvert.cli.main import main

    case = CASES[name]
    src = save_family_model(case, tmp_path / "src", hub_style=True)
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0, result.output
    family = FAMILIES[case.hub_model_type or case.model_type]
    config = json.loads((src / "config.json").read_text())
    text = family.text_config(config)
    assert f"family        {family.model_type} (supported)" in result.output
    assert f"layout        {family.experts.description}" in result.output
    assert (f"experts       {text[family.experts_key(config)]} routed, "
            f"top-{family.top_k_of(text)}") in result.output


def test_inspect_unknown_family_says_not_supported(tmp_path):
    from click.testing import CliRunner

    from hcconvert.cli.main import main

    src = save_family_model(CASES["olmoe"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0, result.output
    assert "'frobnicator': not supported" in result.output
    assert ", ".join(sorted(FAMILIES)) in result.output


@pytest.mark.parametrize("quantization,fragment", [
    ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
      "weight_block_size": [128]}, "quantization_config (fp8) weight_block_size is [128]"),
    ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
])
def test_quantized_checkpoints_are_refused_in_one_line(tmp_path, quantization, fragment):
    from click.testing import CliRunner

    from hcconvert.cli.main import main

    src = save_family_model(CASES["deepseek_v3"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    result = CliRunner().invoke(main, [str(src), "--experts", "4", "--out", str(tmp_path / "o"),
                                       "--dry-run"])
    assert result.exit_code == 2
    assert fragment in result.output


@pytest.mark.parametrize("name", ["deepseek_v3", "minimax_m2", "granitemoe", "gpt_oss",
                                  "llama4_text",
                                  # the router reads the residual, the experts a normed copy
                                  "gemma4_text",
                                  "nemotron_h"])  # ungated experts
def test_auto_fits_through_each_familys_own_router(tmp_path, calib_text, name, monkeypatch):
    """--method auto refits layers under the reduced layer's routing as transformers computes
    it (sigmoid scores, correction bias, groups); the output loads and every layer records
    its choice with a held-out error below the unfitted one or the fit refused. The fit's
    floor of tokens per kept expert is the bench models' (layerfit.MIN_FIT_TOKENS): lowered
    here so that tiny calibrations fit, even under top-1 routing."""
    monkeypatch.setattr(layerfit, "MIN_FIT_TOKENS", 32)
    case = CASES[name]
    src = save_family_model(case, tmp_path / "src")
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(experts=case.reduce_to, method="auto",
                                          calib=str(calib_text), calib_samples=12, seq_len=64),
            progress=False)
    for entry in json.loads((out / "hcconvert.json").read_text())["layers"]:
        fit = entry["layer_fit"]
        assert entry["choice"] and fit["error_fitted"] >= 0
        assert fit["fitted"] == (fit["error_fitted"] < fit["error_unfitted"])
    assert torch.isfinite(logits_of(out, TOKENS)).all()


@pytest.mark.parametrize("method", ["ream", "msmoe", "mergemoe"])
def test_experts_without_a_gate_merge_by_every_method(tmp_path, calib_text, method):
    """Nemotron-H's ReLU² experts have no gate projection: the merges that match neurons by
    their weights or activations, and MergeMoE's fit, work from the up and down ones."""
    case = CASES["nemotron_h"]
    src = save_family_model(case, tmp_path / "src")
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(experts=case.reduce_to, method=method,
                                          calib=str(calib_text), calib_samples=4, seq_len=64),
            progress=False)
    assert torch.isfinite(logits_of(out, TOKENS)).all()


def test_llama4_top_k_above_one_is_refused(tmp_path):
    """Llama-4 scales each expert's input by its score: with top-k > 1 a token reaches its
    experts with k different inputs, which the routing record cannot hold."""
    src = save_family_model(CASES["llama4_text"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 2}))
    with pytest.raises(UserError, match="top-2 routing; hcconvert reads llama4_text's"):
        open_source(str(src))


def as_kimi_k25(src, directory):
    """src (a deepseek_v3 checkpoint) as Kimi-K2.5 stores its text model: under
    language_model., the text config nested (model_type kimi_k2), a vision tower beside."""
    directory.mkdir()
    tensors = {("language_model." + name if name.startswith(("model.", "lm_head.")) else name):
               tensor for name, tensor in load_all(src).items()}
    tensors["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 4, 4)
    tensors["mm_projector.proj.0.weight"] = torch.randn(32, 8)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((src / "config.json").read_text())
    config = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
              "text_config": {**text, "model_type": "kimi_k2"}, "vision_config": {}}
    (directory / "config.json").write_text(json.dumps(config))
    for side in src.glob("tokenizer*"):
        shutil.copy(side, directory / side.name)
    return directory


@pytest.mark.parametrize("name", [*CASES, "kimi_k25"])
def test_the_token_id_check_finds_every_familys_embedding(tmp_path, name):
    """Calibration refuses token ids beyond the embedding table only if it finds the table:
    under the family's own name (Llama-4's and Qwen3.5's language_model., Kimi-K2.5's)."""
    if name == "kimi_k25":
        src = as_kimi_k25(save_family_model(CASES["deepseek_v3"], tmp_path / "v3"),
                          tmp_path / "src")
    else:
        src = save_family_model(CASES[name], tmp_path / "src")
    ckpt, _ = open_source(str(src))
    embedding = next(t for n, t in load_all(src).items() if n == FAMILIES[
        json.loads((src / "config.json").read_text())["model_type"]].embedding)
    assert embedding_rows(ckpt) == embedding.shape[0]


@pytest.mark.parametrize("int4", [False, True])
def test_kimi_k25_converts_as_its_text_model(tmp_path, calib_text, int4):
    """The wrapper's conversion writes exactly what the text model's own conversion writes,
    under the wrapper's names; the vision tower is copied byte for byte; the expert count is
    rewritten inside text_config. int4: Kimi-K2.5's routed experts as Kimi-K2-Thinking's
    compressed-tensors int4, the quantization_config nested in text_config with the rest."""
    if int4:
        src = save_int4_model(KIMI_INT4, tmp_path / "v3")
    else:
        src = save_family_model(CASES["deepseek_v3"], tmp_path / "v3")
    wrapped = as_kimi_k25(src, tmp_path / "k25")
    assert "quantization_config" in json.loads((wrapped / "config.json").read_text())[
        "text_config"] or not int4
    options = ConvertOptions(experts=4, calib=str(calib_text), calib_samples=3, seq_len=48)
    for source, out in ((src, tmp_path / "v3-out"), (wrapped, tmp_path / "k25-out")):
        convert(str(source), out, options, progress=False)
    text_only, wrapper = load_all(tmp_path / "v3-out"), load_all(tmp_path / "k25-out")
    source = load_all(wrapped)
    for name in ("vision_tower.patch_embed.proj.weight", "mm_projector.proj.0.weight"):
        assert torch.equal(wrapper.pop(name), source[name])
    assert wrapper.keys() == {"language_model." + name for name in text_only}
    for name, tensor in text_only.items():
        assert torch.equal(wrapper["language_model." + name], tensor), name
    config = json.loads((tmp_path / "k25-out" / "config.json").read_text())
    assert config["text_config"]["n_routed_experts"] == 4
    if int4:  # written dense, the nested quantization_config goes too
        dense = dataclasses.replace(options, dtype="bf16")
        convert(str(wrapped), tmp_path / "k25-bf16", dense, progress=False)
        text = json.loads((tmp_path / "k25-bf16" / "config.json").read_text())["text_config"]
        assert "quantization_config" not in text and text["n_routed_experts"] == 4
