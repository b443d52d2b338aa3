"""Our layer-by-layer forward equals transformers' on a tiny Mixtral (fp32 tight, bf16 loose)."""

import pytest
import torch
from conftest import save_tiny_mixtral

from hcconvert.convert import open_source
from hcconvert.modeling import decoder_layer, final_logits, rope_tables

# bf16: both sides round every matmul, so agreement is to bf16's ~3 significant digits.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=0.05, atol=0.05)}


def our_forward(directory, tokens, dtype):
    ckpt, spec = open_source(str(directory))
    hidden = ckpt.get("model.embed_tokens.weight")[tokens].to(dtype)
    rope = rope_tables(spec, tokens.shape[1], "cpu", dtype)
    states = [hidden.clone()]
    for layer in range(spec.num_layers):
        w = {k: v.to(dtype) for k, v in ckpt.layer_tensors(layer).items()}
        hidden = decoder_layer(spec, layer, w, hidden, rope)
        states.append(hidden.clone())
    logits = final_logits(spec, ckpt.get("model.norm.weight").to(dtype),
                          ckpt.get("lm_head.weight").to(dtype), hidden)
    return states, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hub_style", [False, True])
def test_layer_forward_matches_transformers(tmp_path, dtype, hub_style):
    from transformers import AutoModelForCausalLM

    src = save_tiny_mixtral(tmp_path / "m", dtype=dtype, hub_style_config=hub_style,
                            num_hidden_layers=3, rope_theta=1e4)
    tokens = torch.randint(3, 259, (2, 40))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    with torch.no_grad():
        reference = model(tokens, output_hidden_states=True)
    states, logits = our_forward(src, tokens, dtype)
    # transformers' last hidden state has the final norm applied; compare the others and logits.
    for layer, (ours, theirs) in enumerate(zip(states[:-1], reference.hidden_states[:-1],
                                               strict=True)):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype], msg=f"layer {layer}")
    torch.testing.assert_close(logits, reference.logits.float(), **TOLERANCE[dtype])
