"""Multi-token-prediction (MTP) layers: DeepSeek-V3's layer 61, GLM-4.5's last layer,
Qwen3-Next's and Qwen3.5's mtp.layers.0.

Such a checkpoint stores a full MoE decoder layer with as many routed experts as the others
(layouts.MtpLayout says where) beside the MTP layer's own tensors: two norms, a projection and
an output norm (DeepSeek, GLM: enorm, hnorm, eh_proj, shared_head.norm beside the layer at
`model.layers.{L}.`, L = num_hidden_layers, and in some checkpoints copies of the embedding and
the LM head; Qwen: mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden, mtp.fc, mtp.norm outside
the text model). config.json has one expert count, so that decoder layer is reduced like the
others; the own tensors are copied as stored.

The model runs it at position i of S tokens t_0..t_{S-1} as
    x_i = projection(cat(embedding_norm(embed(t_{i+1})), hidden_norm(h_i)))
followed by the decoder layer (full attention) over x at positions 0..S-2 (the last position
has no next token). h_i is the main model's last hidden state *after* its final norm:
  - vLLM, model_executor/models/deepseek_mtp.py: DeepSeekMultiTokenPredictorLayer.forward
    gets the target model's output as previous_hidden_states, and DeepseekV2Model.forward
    returns `self.norm(hidden_states, residual)`; the MTP positions are the target's.
  - vLLM, qwen3_next_mtp.py and qwen3_5_mtp.py: Qwen3NextMultiTokenPredictor.forward (and
    Qwen3_5's) computes fc(cat(pre_fc_norm_embedding(embed), pre_fc_norm_hidden(hidden))),
    then one Qwen3NextDecoderLayer built with layer_type="full_attention"; the hidden states
    are Qwen3NextModel.forward's output, `self.norm(hidden_states, residual)`. The norms are
    the model's own zero-centred RMSNorm (weight + 1).
  - SGLang, srt/models/deepseek_nextn.py: DeepseekModelNextN.forward takes
    forward_batch.spec_info.hidden_states, which its LogitsProcessor captures from the states
    it gives the LM head, after the final norm. Its embedding is the main model's ("Use shared
    head and embed weights from target model"), as here; DeepSeek-V3's copy in layer 61
    holds the same values.
  - transformers has no MTP forward: it drops these layers when it loads a checkpoint.
vLLM also zeroes the embedding at position 0 in deepseek_mtp.py ("masking inputs at position
0, as not needed by MTP"); SGLang does not, and neither do we: one position per sequence.
N sequences, S tokens, H hidden.
"""

from __future__ import annotations

import copy
from collections import ChainMap
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import ATTENTION_BATCH, Decoder, HiddenStream


class NextTokenInputs:
    """What an MTP layer's calibration takes from the main model, captured while the main
    model's embedding and final norm are loaded: the next tokens' embeddings at S-1 positions,
    with the arguments (masks, position embeddings) the model gives its layers at those
    positions, and the final norm. own: the MTP layer's own tensors stored outside its layer
    (Qwen's mtp.fc...), read with the globals, by name below their prefix."""

    def __init__(self, decoder: Decoder, tokens: torch.Tensor, device: torch.device,
                 own: Mapping[str, torch.Tensor]):
        # The model's own forward over t_1..t_{S-1}: its first layer input is embed(t_{i+1}) at
        # position i (no MTP family scales its embedding); its masks and rotary embeddings
        # depend on the positions only, so they are those of positions 0..S-2.
        self.stream = HiddenStream(decoder, tokens[:, 1:], device)
        self.final_norm = copy.deepcopy(decoder.model.model.norm)
        self.names, self.own = decoder.family.mtp, own

    @torch.no_grad()
    def stream_for(self, raw: Mapping[str, torch.Tensor], main: HiddenStream) -> HiddenStream:
        """The MTP layer's input x (module docstring) from its own tensors (those beside its
        decoder layer in raw, its tensors below the layer prefix, or those given at the start)
        and the main model's states after the last decoder layer; it replaces the embeddings,
        so one MTP layer can be fed."""
        own = ChainMap(self.own, raw)
        hidden, names = self.stream.hidden, self.names
        enorm, hnorm = (self._norm(own[name]) for name in (names.embedding_norm,
                                                           names.hidden_norm))
        eh_proj = own[names.projection].to(hidden.device, hidden.dtype)
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
