"""Multi-token-prediction layers (DeepSeek-V3's layer 61, GLM's last layer), added here to tiny
checkpoints since transformers saves none: validated before any work, calibrated the way vLLM
and SGLang run them, reduced with the other MoE layers, their own tensors copied as stored."""

import functools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_all, logits_of
from family_models import CASES, MTP_SHARD, add_mtp_layer, save_family_model
from safetensors.torch import load_file, save_file
from test_families import TOKENS, keep_index, reference_merge, rewrite_tensor
from test_hostile import assert_one_error_line

from hcconvert.calibration import load_calibration
from hcconvert.cli import main
from hcconvert.convert import convert
from hcconvert.demo import data_file
from hcconvert.options import HC_SMOE, ConvertOptions
from hcconvert.source import Checkpoint

OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# deepseek_v3: groups, MLA, the embedding and head copies; glm4_moe: GQA with partial rotary
# and QK norm, and no copies.
MTP_CASES = {"deepseek_v3": True, "glm4_moe": False}


@pytest.fixture(scope="module", params=list(MTP_CASES))
def converted(request, tmp_path_factory):
    """(case, source, output, options, MTP layer index) of one conversion per family."""
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = save_family_model(case, root / "src")
    layer = add_mtp_layer(src, with_copies=MTP_CASES[request.param])
    options = ConvertOptions(**HC_SMOE, experts=case.reduce_to,
                             calib=str(data_file("demo_calib.txt")), calib_samples=3,
                             seq_len=40, router="freq-avg", max_shard_size=50_000)
    convert(str(src), root / "out", options, progress=False)
    return case, src, root / "out", options, layer


def mtp_entry(out: Path, layer: int) -> dict:
    record = json.loads((out / "hcconvert.json").read_text())
    return next(entry for entry in record["layers"] if entry["layer"] == layer)


def test_mtp_layer_is_reduced_and_its_own_tensors_copied(converted):
    case, src, out, options, layer = converted
    prefix = f"model.layers.{layer}."
    source, written = load_all(src), load_all(out)
    own = [n for n in OWN + COPIES if prefix + n in source]
    assert len(own) == len(OWN) + (2 if MTP_CASES[case.model_type] else 0)
    for name in own:  # the same dtype and the same bits
        assert torch.equal(written[prefix + name].view(torch.uint8),
                           source[prefix + name].view(torch.uint8)), name
    experts, hidden = case.reduce_to, source["model.norm.weight"].shape[0]
    assert written[prefix + case.router].shape == (experts, hidden)
    assert written[prefix + case.router_bias].shape == (experts,)
    stored = {n.removeprefix(prefix).split(".")[2] for n in written
              if n.startswith(prefix + "mlp.experts.")}
    assert stored == {str(e) for e in range(experts)}
    entry = mtp_entry(out, layer)
    assert sum(map(len, entry["groups"])) == len(entry["frequencies"])
    # Every position but each sequence's last has a next token.
    assert entry["tokens"] == options.calib_samples * (options.seq_len - 1)


def test_output_loads_and_equals_a_reference_merge(converted, tmp_path):
    case, src, out, options, layer = converted
    written, expected = load_all(out), reference_merge(case, src, out, options.router)
    assert any(name.startswith(f"model.layers.{layer}.mlp.experts.") for name in expected)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, msg=name)
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_bytes((out / "config.json").read_bytes())
    save_file(expected, str(reference / "model.safetensors"), metadata={"format": "pt"})
    # transformers ignores the MTP layer: the main model's logits are the reference's.
    torch.testing.assert_close(logits_of(out, TOKENS), logits_of(reference, TOKENS))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def mtp_block_model(src: Path, layer: int, directory: Path):
    """A one-layer model of src's family whose only (MoE) layer is the MTP layer's decoder
    layer, with src's embedding, norm and head, as stock transformers loads it."""
    from transformers import AutoModelForCausalLM

    directory.mkdir()
    config = json.loads((src / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(
        {**config, "num_hidden_layers": 1, "first_k_dense_replace": 0,
         "num_nextn_predict_layers": 0}))
    prefix = f"model.layers.{layer}."
    tensors = {name.replace(prefix, "model.layers.0."): tensor
               for name, tensor in load_all(src).items()
               if not name.startswith("model.layers.") or (
                   name.startswith(prefix) and name.removeprefix(prefix) not in OWN + COPIES)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def test_mtp_frequencies_equal_an_independent_calibration(converted, tmp_path):
    """The MTP layer's recorded frequencies are what transformers' own router picks when the
    layer runs as vLLM and SGLang run it: at position i, eh_proj(cat(enorm(embed(t_{i+1})),
    hnorm(h_i))) with h_i the stock model's last hidden state after its final norm, then the
    decoder layer over positions 0..S-2."""
    from transformers import AutoModelForCausalLM

    case, src, out, options, layer = converted
    tokens = load_calibration(Checkpoint(src), options.calib, options.calib_samples,
                              options.seq_len, options.seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    own = {name.removeprefix(f"model.layers.{layer}."): tensor.float()
           for name, tensor in load_file(src / MTP_SHARD).items()}
    eps = model.config.rms_norm_eps
    with torch.no_grad():
        final = model(tokens, output_hidden_states=True).hidden_states[-1]
        embedded = model.model.embed_tokens(tokens[:, 1:])
        x = torch.cat((rms_norm(embedded, own["enorm.weight"], eps),
                       rms_norm(final[:, :-1], own["hnorm.weight"], eps)), dim=-1)
        x = x @ own["eh_proj.weight"].T
        block = mtp_block_model(src, layer, tmp_path / "block")
        picks = {}
        block.model.layers[0].mlp.gate.register_forward_hook(
            functools.partial(keep_index, picks, layer))
        block.model(inputs_embeds=x)
    entry = mtp_entry(out, layer)
    counts = torch.bincount(picks[layer].flatten(), minlength=len(entry["frequencies"]))
    assert counts.tolist() == entry["frequencies"]


def with_config(**changes):
    def change(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **changes}))
    return change


def replaced(name: str, change, new_name: str | None = None):
    return lambda src: rewrite_tensor(src, name, change, new_name)


@pytest.mark.parametrize("damage,fragment", [
    (replaced("model.layers.3.eh_proj.weight", lambda t: t[:, :32].contiguous()),
     "tensor model.layers.3.eh_proj.weight has shape [32, 32], expected [32, 64]"),
    (replaced("model.layers.3.hnorm.weight", lambda t: None),
     "tensor model.layers.3.hnorm.weight is missing"),
    (replaced("model.layers.3.embed_tokens.weight", lambda t: t[:-1].contiguous()),
     "tensor model.layers.3.embed_tokens.weight has shape [258, 32], expected [259, 32]"),
    (replaced("model.layers.3.self_attn.kv_a_layernorm.weight", lambda t: None),
     "tensor model.layers.3.self_attn.kv_a_layernorm.weight is missing"),
    (replaced("model.layers.3.mlp.experts.5.up_proj.weight", lambda t: t[:-1].contiguous()),
     "tensor model.layers.3.mlp.experts.5.up_proj.weight has shape [23, 32]"),
    (replaced("model.layers.3.mlp.gate.weight", lambda t: t[:-1].contiguous()),
     "tensor model.layers.3.mlp.gate.weight has shape [7, 32]"),
    (replaced("model.layers.3.enorm.weight", lambda t: t.clone(), "model.layers.3.mtp_norm.weight"),
     "tensor model.layers.3.mtp_norm.weight is not part of a deepseek_v3 layer"),
    (replaced("model.layers.3.enorm.weight", lambda t: t.clone(), "model.layers.4.enorm.weight"),
     "tensor model.layers.4.enorm.weight is beyond num_hidden_layers=3 + "
     "num_nextn_predict_layers=1"),
    (lambda src: (with_config(num_nextn_predict_layers=2)(src),
                  rewrite_tensor(src, "model.layers.3.enorm.weight", lambda t: t.clone(),
                                 "model.layers.4.enorm.weight")),
     "tensor model.layers.4.enorm.weight belongs to a second multi-token-prediction layer"),
], ids=["eh_proj-shape", "hnorm-missing", "embed-copy-shape", "attention-norm-missing",
        "expert-shape", "router-shape", "unknown-tensor", "beyond-layers", "second-mtp-layer"])
def test_bad_mtp_tensors_are_refused_in_one_line(tmp_path, damage, fragment):
    src = save_family_model(CASES["deepseek_v3"], tmp_path / "src")
    add_mtp_layer(src)
    damage(src)
    result = CliRunner().invoke(main, [str(src), "--experts", "4", "--out",
                                       str(tmp_path / "out"), "--dry-run"])
    assert_one_error_line(result.exit_code, result.stderr, fragment)
    assert not (tmp_path / "out").exists()


def test_inspect_and_dry_run_mention_the_mtp_layer(tmp_path):
    src = save_family_model(CASES["deepseek_v3"], tmp_path / "src")
    declared = CliRunner().invoke(main, ["inspect", str(src)])
    assert declared.exit_code == 0, declared.output
    assert "mtp           none stored (config.json declares 1)" in declared.output
    add_mtp_layer(src)
    inspected = CliRunner().invoke(main, ["inspect", str(src)])
    assert inspected.exit_code == 0, inspected.output
    assert "family        deepseek_v3 (supported)" in inspected.output
    assert "mtp           layer 3, reduced with the MoE layers" in inspected.output
    planned = CliRunner().invoke(main, [str(src), "--experts", "4", "--out",
                                        str(tmp_path / "out"), "--dry-run"])
    assert "mtp           layer 3, reduced with the MoE layers" in planned.output
