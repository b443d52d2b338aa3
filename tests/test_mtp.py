"""Multi-token-prediction layers (DeepSeek-V3's layer 61, GLM's last layer, Qwen3-Next's and
Qwen3.5's mtp.layers.0), added here to tiny checkpoints since transformers saves none: validated
before any work, calibrated the way vLLM and SGLang run them, reduced with the other MoE layers,
their own tensors copied as stored."""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoints import load_all, rewrite_tensor
from cli_runs import assert_one_error_line
from click.testing import CliRunner
from family_models import (
    CASES,
    MTP_SHARD,
    QWEN_MTP_OWN,
    Case,
    add_mtp_layer,
    add_qwen_mtp_layer,
    save_family_model,
)
from parity import (
    TOKENS,
    keep_index,
    reference_merge,
    transformers_forward,
)
from safetensors.torch import load_file, save_file

from hcconvert.cli.demo import data_file
from hcconvert.cli.main import main
from hcconvert.io.source import Checkpoint
from hcconvert.pipeline.calibration import load_calibration
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class MtpCase:
    """How a family's Hub checkpoints store the MTP layer's own tensors."""

    own_prefix: str | None  # None: beside the decoder layer
    own: tuple[str, str, str, str]  # embedding norm, hidden norm, projection, output norm
    copies: tuple[str, ...] = ()  # the embedding and head copies DeepSeek-V3 carries
    norm_offset: float = 0.0  # Qwen's norms scale by 1 + weight

    def own_names(self, layer_prefix: str) -> list[str]:
        prefix = self.own_prefix or layer_prefix
        return [prefix + name for name in self.own + self.copies]


# deepseek_v3: groups, MLA, the embedding and head copies; glm4_moe: GQA with partial rotary
# and QK norm, and no copies; qwen3_next: outside the text model beside linear-attention
# layers, no count in config.json; qwen3_5_moe: the same in a vision-language wrapper whose
# other layers' experts are fused, the MTP layer's per expert.
MTP_CASES = {"deepseek_v3": MtpCase(None, OWN, COPIES), "glm4_moe": MtpCase(None, OWN),
             "qwen3_next": MtpCase("mtp.", QWEN_MTP_OWN, norm_offset=1.0),
             "qwen3_5_moe": MtpCase("mtp.", QWEN_MTP_OWN, norm_offset=1.0)}


def add_mtp(name: str, src: Path) -> int:
    case = CASES[name]
    if case.mtp_prefix is not None:
        return add_qwen_mtp_layer(case, src)
    return add_mtp_layer(src, with_copies=bool(MTP_CASES[name].copies))


@pytest.fixture(scope="module", params=list(MTP_CASES))
def converted(request, tmp_path_factory):
    """(case, source, output, options, MTP layer index) of one conversion per family."""
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = save_family_model(case, root / "src")
    layer = add_mtp(request.param, src)
    options = ConvertOptions(method="hc-smoe", experts=case.reduce_to,
                             calib=str(data_file("demo_calib.txt")), calib_samples=3,
                             seq_len=40, router="freq-avg", max_shard_size=50_000)
    convert(str(src), root / "out", options, progress=False)
    return case, src, root / "out", options, layer


def mtp_entry(out: Path, layer: int) -> dict:
    record = json.loads((out / "hcconvert.json").read_text())
    return next(entry for entry in record["layers"] if entry["layer"] == layer)


def test_mtp_layer_is_reduced_and_its_own_tensors_copied(converted):
    case, src, out, options, layer = converted
    prefix = case.layer_prefix(layer)
    source, written = load_all(src), load_all(out)
    own = MTP_CASES[case.model_type].own_names(prefix)
    assert set(own) <= set(source)
    for name in own:  # the same dtype and the same bits
        assert torch.equal(written[name].view(torch.uint8), source[name].view(torch.uint8)), name
    experts, hidden = case.reduce_to, source[case.text_prefix + "norm.weight"].shape[0]
    assert written[prefix + case.router].shape == (experts, hidden)
    if case.router_bias is not None:
        assert written[prefix + case.router_bias].shape == (experts,)
    stored = {n.removeprefix(prefix).split(".")[2] for n in written
              if n.startswith(prefix + "mlp.experts.")}
    assert stored == {str(e) for e in range(experts)}  # per expert, as the Hub stores them
    # Every tensor but the reduced layers' routers and experts is written as stored.
    record = json.loads((out / "hcconvert.json").read_text())
    reduced = tuple(case.layer_prefix(entry["layer"]) + part for entry in record["layers"]
                    for part in (case.router, *filter(None, [case.router_bias]),
                                 "mlp.experts."))
    unchanged = [n for n in source if not n.startswith(reduced)]
    for name in unchanged:
        assert torch.equal(written[name].view(torch.uint8), source[name].view(torch.uint8)), name
    entry = mtp_entry(out, layer)
    assert sum(map(len, entry["groups"])) == len(entry["frequencies"])
    # Every position but each sequence's last has a next token.
    assert entry["tokens"] == options.calib_samples * (options.seq_len - 1)


def test_output_loads_and_equals_a_reference_merge(converted, tmp_path):
    case, src, out, options, layer = converted
    written, expected = load_all(out), reference_merge(case, src, out, options.router)
    assert any(name.startswith(case.layer_prefix(layer) + "mlp.experts.") for name in expected)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, msg=name)
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_bytes((out / "config.json").read_bytes())
    save_file(expected, str(reference / "model.safetensors"), metadata={"format": "pt"})
    # transformers ignores the MTP layer: the main model's logits are the reference's.
    torch.testing.assert_close(transformers_forward(case, out, TOKENS, torch.float32).logits,
                               transformers_forward(case, reference, TOKENS,
                                                    torch.float32).logits)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def text_model(case: Case, model):
    """The text model (embedding, layers, final norm) of a loaded checkpoint."""
    return model.model.language_model if case.vision is not None else model.model


def mtp_block_model(case: Case, src: Path, layer: int, directory: Path):
    """A one-layer model of src's family whose only layer, a full-attention MoE layer, is the
    MTP layer's decoder layer, with src's embedding, norm and head, as stock transformers
    loads it."""
    directory.mkdir()
    config = json.loads((src / "config.json").read_text())
    one_layer = {"num_hidden_layers": 1, "first_k_dense_replace": 0,
                 "num_nextn_predict_layers": 0, "mtp_num_hidden_layers": 0}
    if "layer_types" in config.get("text_config", config):
        one_layer.update(layer_types=["full_attention"], mlp_only_layers=[])
    if case.vision is not None:
        config = {**config, "text_config": {**config["text_config"], **one_layer}}
    else:
        config = {**config, **one_layer}
    (directory / "config.json").write_text(json.dumps(config))
    layers, prefix = case.layer_prefix(0).removesuffix("0."), case.layer_prefix(layer)
    own = MTP_CASES[case.model_type].own_names(prefix)
    tensors = {name.replace(prefix, layers + "0."): tensor
               for name, tensor in load_all(src).items()
               if not name.startswith((layers, "mtp.")) or (
                   name.startswith(prefix) and name not in own)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return case.load(directory, dtype=torch.float32)


def test_mtp_frequencies_equal_an_independent_calibration(converted, tmp_path):
    """The MTP layer's recorded frequencies are what transformers' own router picks when the
    layer runs as vLLM (and for DeepSeek SGLang) runs it: at position i,
    projection(cat(embedding_norm(embed(t_{i+1})), hidden_norm(h_i))) with h_i the stock
    model's last hidden state after its final norm, then the decoder layer over positions
    0..S-2."""
    case, src, out, options, layer = converted
    mtp = MTP_CASES[case.model_type]
    tokens = load_calibration(Checkpoint(src), options.calib, options.calib_samples,
                              options.seq_len, options.seed)
    model = text_model(case, case.load(src, dtype=torch.float32))
    stored = load_file(src / MTP_SHARD)
    embedding_norm, hidden_norm, projection, _ = (
        stored[name].float() for name in mtp.own_names(case.layer_prefix(layer))[:4])
    eps = model.config.rms_norm_eps
    with torch.no_grad():
        final = model(tokens).last_hidden_state  # after the final norm
        embedded = model.embed_tokens(tokens[:, 1:])
        x = torch.cat((rms_norm(embedded, mtp.norm_offset + embedding_norm, eps),
                       rms_norm(final[:, :-1], mtp.norm_offset + hidden_norm, eps)), dim=-1)
        x = x @ projection.T
        block = text_model(case, mtp_block_model(case, src, layer, tmp_path / "block"))
        picks = {}
        block.layers[0].mlp.gate.register_forward_hook(
            functools.partial(keep_index, picks, layer))
        block(inputs_embeds=x)
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


DEEPSEEK_DAMAGE = [
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
]
# Qwen's, outside the text model: its own tensors and its decoder layer.
QWEN_DAMAGE = [
    (replaced("mtp.fc.weight", lambda t: t[:, :32].contiguous()),
     "tensor mtp.fc.weight has shape [32, 32], expected [32, 64]"),
    (replaced("mtp.pre_fc_norm_hidden.weight", lambda t: None),
     "tensor mtp.pre_fc_norm_hidden.weight is missing"),
    (replaced("mtp.layers.0.self_attn.q_norm.weight", lambda t: None),
     "tensor mtp.layers.0.self_attn.q_norm.weight is missing"),
    (replaced("mtp.layers.0.mlp.gate.weight", lambda t: t[:-1].contiguous()),
     "tensor mtp.layers.0.mlp.gate.weight has shape [5, 32]"),
    (replaced("mtp.layers.0.input_layernorm.weight", lambda t: t.clone(),
              "mtp.layers.1.input_layernorm.weight"),
     "tensor mtp.layers.1.input_layernorm.weight is beyond num_hidden_layers=3 + "
     "num_nextn_predict_layers=1"),
]


@pytest.mark.parametrize("name,damage,fragment", [
    *[("deepseek_v3", *case) for case in DEEPSEEK_DAMAGE],
    *[("qwen3_next", *case) for case in QWEN_DAMAGE]],
    ids=["eh_proj-shape", "hnorm-missing", "embed-copy-shape", "attention-norm-missing",
         "expert-shape", "router-shape", "unknown-tensor", "beyond-layers", "second-mtp-layer",
         "qwen-fc-shape", "qwen-norm-missing", "qwen-attention-norm-missing",
         "qwen-router-shape", "qwen-beyond-layers"])
def test_bad_mtp_tensors_are_refused_in_one_line(tmp_path, name, damage, fragment):
    src = save_family_model(CASES[name], tmp_path / "src")
    add_mtp(name, src)
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


def test_inspect_says_qwen3_next_expects_one_mtp_layer(tmp_path):
    """Qwen3-Next's config.json declares no MTP layer; vLLM assumes one, stored as mtp.*."""
    src = save_family_model(CASES["qwen3_next"], tmp_path / "src")
    declared = CliRunner().invoke(main, ["inspect", str(src)])
    assert "mtp           none stored (1 by default)" in declared.output
    add_mtp("qwen3_next", src)
    inspected = CliRunner().invoke(main, ["inspect", str(src)])
    assert "family        qwen3_next (supported)" in inspected.output
    assert "mtp           layer 3, reduced with the MoE layers" in inspected.output
