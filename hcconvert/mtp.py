"""Multi-token-prediction (MTP) layers: DeepSeek-V3's layer 61, GLM-4.5's last layer.

Such a checkpoint stores its MTP layer after the decoder layers (`model.layers.{L}.`, L =
num_hidden_layers, config key num_nextn_predict_layers): its own tensors (enorm, hnorm, eh_proj,
shared_head.norm, and in some checkpoints copies of the embedding and the LM head) beside a
full MoE decoder layer with as many routed experts as the others. config.json has one expert
count, so that decoder layer is reduced like the others; the MTP layer's own tensors are
copied as stored.

The model runs it at position i of S tokens t_0..t_{S-1} as
    x_i = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))
followed by the decoder layer over x at positions 0..S-2 (the last position has no next
token). h_i is the main model's last hidden state *after* its final norm:
  - vLLM, model_executor/models/deepseek_mtp.py: DeepSeekMultiTokenPredictorLayer.forward
    gets the target model's output as previous_hidden_states, and DeepseekV2Model.forward
    returns `self.norm(hidden_states, residual)`; the MTP positions are the target's.
  - SGLang, srt/models/deepseek_nextn.py: DeepseekModelNextN.forward takes
    forward_batch.spec_info.hidden_states, which its LogitsProcessor captures from the states
    it gives the LM head, after the final norm. Its embedding is the main model's ("Use shared
    head and embed weights from target model"), as here; DeepSeek-V3's copy in layer 61
    holds the same values.
  - transformers has no MTP forward: it drops these layers when it loads a checkpoint.
vLLM also zeroes the embedding at position 0 ("masking inputs at position 0, as not needed by
MTP"); SGLang does not, and neither do we: one position per sequence.
N sequences, S tokens, H hidden.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import ATTENTION_BATCH, Decoder, HiddenStream

# Below the layer prefix: the tensors every MTP layer holds besides its decoder layer, and the
# copies of the embedding and LM head some checkpoints add (DeepSeek-V3's layer 61).
REQUIRED = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
OPTIONAL = ("shared_head.head.weight", "embed_tokens.weight")


def mtp_shapes(hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The shape of each MTP-only tensor, by its name below the layer prefix."""
    matrix = {"eh_proj.weight": (hidden, 2 * hidden), "shared_head.head.weight": (vocab, hidden),
              "embed_tokens.weight": (vocab, hidden)}
    return {name: matrix.get(name, (hidden,)) for name in REQUIRED + OPTIONAL}


class NextTokenInputs:
    """What an MTP layer's calibration takes from the main model, captured while the main
    model's embedding and final norm are loaded: the next tokens' embeddings at S-1 positions,
    with the arguments (masks, position embeddings) the model gives its layers at those
    positions, and the final norm."""

    def __init__(self, decoder: Decoder, tokens: torch.Tensor, device: torch.device):
        # The model's own forward over t_1..t_{S-1}: its first layer input is embed(t_{i+1}) at
        # position i (DeepSeek and GLM scale no embedding); its masks and rotary embeddings
        # depend on the positions only, so they are those of positions 0..S-2.
        self.stream = HiddenStream(decoder, tokens[:, 1:], device)
        self.final_norm = copy.deepcopy(decoder.model.model.norm)

    @torch.no_grad()
    def stream_for(self, raw: dict[str, torch.Tensor], main: HiddenStream) -> HiddenStream:
        """The MTP layer's input x (module docstring) from its tensors as stored (raw) and
        the main model's states after the last decoder layer; it replaces the embeddings, so
        one MTP layer can be fed."""
        hidden = self.stream.hidden
        enorm, hnorm = (self._norm(raw[name]) for name in ("enorm.weight", "hnorm.weight"))
        eh_proj = raw["eh_proj.weight"].to(hidden.device, hidden.dtype)
        for start in range(0, hidden.shape[0], ATTENTION_BATCH):
            rows = slice(start, start + ATTENTION_BATCH)
            previous = hnorm(self.final_norm(main.hidden[rows, :-1]))
            hidden[rows] = F.linear(torch.cat((enorm(hidden[rows]), previous), dim=-1), eh_proj)
        return self.stream

    def _norm(self, weight: torch.Tensor) -> nn.Module:
        """The family's RMSNorm (the final norm's class and epsilon) with another weight."""
        norm = copy.deepcopy(self.final_norm)
        norm.weight = nn.Parameter(weight.to(norm.weight.device, norm.weight.dtype),
                                   requires_grad=False)
        return norm
