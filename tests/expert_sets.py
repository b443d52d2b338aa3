"""Experts built in memory for the merge tests: random SwiGLU experts, and GPT-OSS-style biased
experts as neuron-permuted copies of one."""

import torch

from hcconvert.model.activation import Activation
from hcconvert.model.experts import Experts


def random_experts(count=3, ffn=16, hidden=8, seed=0) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    return Experts(torch.randn(count, ffn, hidden, generator=gen),
                   torch.randn(count, ffn, hidden, generator=gen),
                   torch.randn(count, hidden, ffn, generator=gen))


GPT_OSS_ACTIVATION = Activation("clamped_swiglu", alpha=1.702, limit=1.0)


def biased_permuted_copies(perms: list[torch.Tensor]) -> Experts:
    """GPT-OSS-style experts (biases, clamped SwiGLU, a limit the inputs exceed): expert 0
    of a random set, then one neuron-permuted copy per permutation."""
    gen = torch.Generator().manual_seed(7)
    base = random_experts(count=1)
    gate_bias, up_bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    down_bias = torch.randn(8, generator=gen)
    copies = [torch.arange(16), *perms]
    return Experts(*(torch.stack([t[p] for p in copies]) for t in (base.gate[0], base.up[0])),
                   torch.stack([base.down[0][:, p] for p in copies]),
                   torch.stack([gate_bias[p] for p in copies]),
                   torch.stack([up_bias[p] for p in copies]),
                   down_bias.repeat(len(copies), 1), GPT_OSS_ACTIVATION)
