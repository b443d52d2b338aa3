"""REAM as its official code runs it, on a transformers Mixtral held in memory: the reference
that `hcconvert --method ream` is tested against.

Written from the official code (github.com/SamsungSAILMontreal/ream: `ream/merger.py`
Merger.fit and _merge, `ream/ream.py` pseudo_group, `ream/saliency.py` reap,
`ream/moe_utils.py` run_all_experts, `ream/weight_utils.py`, `ream/utils.py`), with its
defaults (saliency reap, merging logits+weights, grouping ream, sequential, gate outputs and
gated similarity on), not from hcconvert's implementation. Adapted only where a tiny model or
the test needs it:
- every calibration sequence in one batch (n_batches = 1: the per-batch means are means over
  all tokens);
- numpy's global generator seeded with seed + layer before each layer's statistics (the
  official code seeds it once, when it loads its data);
- min(64, 3H) principal components, since torch.pca_lowrank needs q <= 3H.
E experts, F expert ffn, H hidden, T tokens.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

PCA_DIM = 64
ACT_SAMPLES = 1024 * 32


def normalize_rows(x, eps=1e-8):
    return x / (torch.linalg.norm(x, dim=-1, keepdim=True) + eps)


def dist2sim(a):
    return 1 - a / a.max()


def run_all_experts(moe, hidden_states, act_samples):
    """moe_utils.run_all_experts with gated_sim and without final_reduce, for fused experts."""
    batch, seq, hidden = hidden_states.shape
    flat_input = hidden_states.reshape(batch * seq, hidden)
    n_experts = moe.experts.num_experts
    router_logits = F.linear(flat_input, moe.gate.weight).view(batch, seq, n_experts)
    softmax_logits = F.softmax(router_logits.view(-1, n_experts), dim=-1, dtype=torch.float)
    outputs_act, outputs = [], []
    for i in range(n_experts):
        gate, up = F.linear(flat_input, moe.experts.gate_up_proj[i]).chunk(2, dim=-1)
        out_act = moe.experts.act_fn(gate) * up
        out = F.linear(out_act, moe.experts.down_proj[i])
        out = out * softmax_logits[:, i].view(-1, 1)
        ind = np.random.permutation(out_act.shape[0])[:min(act_samples, out_act.shape[0])]
        outputs_act.append(out_act[ind])
        outputs.append(out)
    return router_logits, torch.stack(outputs), torch.stack(outputs_act)


def reap(gate_logits, expert_activations, top_k):
    """saliency.reap."""
    n_experts = gate_logits.shape[-1]
    gate = F.softmax(gate_logits.view(-1, n_experts), dim=-1, dtype=torch.float)
    gate, selected_experts = torch.topk(gate, k=top_k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_classes=n_experts).permute(2, 1, 0)
    expert_hitted = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    saliency = torch.zeros(n_experts)
    for exp_idx in expert_hitted:
        exp_idx = exp_idx.item()
        current_state = expert_activations[exp_idx]
        idx, top_x = torch.where(expert_mask[exp_idx])
        current_state = current_state[None, top_x].reshape(-1, current_state.shape[-1])
        saliency[exp_idx] += (current_state.norm(dim=-1) * gate[top_x, idx]).mean().item()
    return saliency


def pseudo_group(saliency, expert_logits, k, gate_logits, group_size):
    """ream.pseudo_group with gate logits and group_size > 0."""
    x = normalize_rows(gate_logits.float().transpose(0, 1))
    sim_gate = dist2sim(torch.cdist(x, x).numpy())
    n_experts = expert_logits.shape[0]
    saliency = saliency.numpy()
    d = np.zeros((n_experts, n_experts), dtype=np.float32)
    for i in range(n_experts):
        for j in range(i + 1, n_experts):
            sim_out = ((F.cosine_similarity(expert_logits[i], expert_logits[j]) + 1) / 2
                       ).mean().item()
            d[i, j] = d[j, i] = 1 - (sim_out + sim_gate[i, j]) / 2
    centroid_inds = np.argsort(saliency)[::-1].copy()[:k]
    cluster_labels = np.zeros(n_experts) - 1
    cluster_labels[centroid_inds] = np.arange(k)
    if k < n_experts // group_size:
        raise ValueError("group size too small")
    for centroid in centroid_inds:
        top_close = np.argsort(d[centroid])
        group = [centroid]
        for ind in top_close:
            if ind != centroid and cluster_labels[ind] == -1:
                group.append(ind)
            if len(group) >= group_size:
                break
        for ind in group:
            cluster_labels[ind] = cluster_labels[centroid]
        if (cluster_labels >= 0).all():
            break
    assert (cluster_labels >= 0).all()
    return cluster_labels, centroid_inds


def experts_weight_matrix(experts):
    """weight_utils.experts_weight_matrix: [E, F, 3H] rows [gate_f | up_f | down[:, f]]."""
    gate_up = experts.gate_up_proj.data.float()
    gate, up = gate_up[:, :experts.intermediate_dim], gate_up[:, experts.intermediate_dim:]
    return torch.cat([gate, up, experts.down_proj.data.float().permute(0, 2, 1)], dim=2)


def pca_reduce(x, r):
    """weight_utils.pca_reduce of one [n*F, D] tensor."""
    x = x - x.mean(dim=-2, keepdim=True)
    torch.manual_seed(0)
    _, s, v = torch.pca_lowrank(x, q=r)
    return x @ (v[:, :r] * s[:r].reshape(1, r))


def merge_group(gate_up, down, group, saliency, expert_weights, expert_act):
    """Merger._merge ("logits+weights"): the group's members aligned to its first expert,
    then their saliency-weighted average; gate_up [E, 2F, H], down [E, H, F]."""
    w = saliency.numpy()[group]
    w = w / w.sum()
    ffn = down.shape[2]
    act = expert_act.permute(0, 2, 1).float()  # [E, F, samples]
    act_centroid = normalize_rows(act[group[0]]) if act.shape[-1] > 1 else act[group[0]]
    features = normalize_rows(expert_weights)
    merged_gate_up = gate_up[group[0]].float() * w[0]
    merged_down = down[group[0]].float() * w[0]
    for j, idx in enumerate(group[1:]):
        act_j = normalize_rows(act[idx]) if act.shape[-1] > 1 else act[idx]
        cost = (torch.cdist(act_centroid, act_j).numpy()
                + torch.cdist(features[group[0]], features[idx]).numpy())
        _, perm = linear_sum_assignment(cost)
        aligned = torch.cat((gate_up[idx][:ffn][perm], gate_up[idx][ffn:][perm]), dim=0)
        merged_gate_up = merged_gate_up + w[j + 1] * aligned.float()
        merged_down = merged_down + w[j + 1] * down[idx][:, perm].float()
    return merged_gate_up, merged_down


def first_layer_inputs(model, input_ids):
    """The first decoder layer's hidden states and keyword arguments (the official
    get_moe_input), caught from the model's own forward."""
    caught = {}

    class Caught(Exception):
        pass

    def catch(module, args, kwargs):
        caught["hidden"], caught["kwargs"] = args[0] if args else kwargs.pop("hidden_states"), \
            kwargs
        raise Caught

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except Caught:
        pass
    finally:
        handle.remove()
    return caught["hidden"], caught["kwargs"]


def collect(layer, hidden, kwargs, top_k):
    """Merger._forward_pass(collect_outputs=True) over one batch: the MoE block's statistics
    from a forward hook."""
    expert_outs = {}

    def hook_fn(module, inputs, output):
        gate, final, act = run_all_experts(module, inputs[0], ACT_SAMPLES)
        expert_outs.update(gate=gate, final=final.mean(1, keepdim=True), act=act,
                           saliency=reap(gate, final, top_k))

    handle = layer.mlp.register_forward_hook(hook_fn)
    layer(hidden, **kwargs)
    handle.remove()
    return expert_outs


@torch.no_grad()
def ream_reference(model, input_ids, merge_size, group_size=16, seed=42):
    """Merger(model, merge_size, group_size=group_size).fit() on calibration input_ids [N, S]:
    the model reduced in place; returns each layer's groups, leader first then members
    ascending, ordered by leader."""
    top_k = model.config.num_experts_per_tok
    hidden, kwargs = first_layer_inputs(model, input_ids)
    all_groups = []
    for layer_ind, layer in enumerate(model.model.layers):
        moe = layer.mlp
        np.random.seed(seed + layer_ind)
        expert_outs = collect(layer, hidden, kwargs, top_k)
        n_experts = moe.experts.num_experts
        saliency = expert_outs["saliency"]
        zeros = saliency == 0
        if zeros.sum() > 0:
            saliency[zeros] = min(0.5, saliency[saliency > 0].min().item())
        weights = experts_weight_matrix(moe.experts)
        pca_dim = min(PCA_DIM, weights.shape[2])
        expert_weights = pca_reduce(normalize_rows(weights).flatten(0, 1), pca_dim)
        expert_weights = expert_weights.reshape(n_experts, -1, pca_dim)
        labels, centroids = pseudo_group(saliency, expert_outs["final"], merge_size,
                                         expert_outs["gate"].view(-1, n_experts), group_size)
        groups = [sorted(map(int, np.where(labels == j)[0]), key=lambda g: g not in centroids)
                  for j in range(merge_size)]
        gate_up = moe.experts.gate_up_proj.data.clone()
        down = moe.experts.down_proj.data.clone()
        for group in groups:
            if len(group) > 1:
                merged = merge_group(gate_up, down, group, saliency, expert_weights,
                                     expert_outs["act"])
                moe.experts.gate_up_proj.data[group[0]] = merged[0]
                moe.experts.down_proj.data[group[0]] = merged[1]
        keep = sorted(group[0] for group in groups)
        moe.experts.gate_up_proj.data = moe.experts.gate_up_proj.data[keep]
        moe.experts.down_proj.data = moe.experts.down_proj.data[keep]
        moe.experts.num_experts = moe.gate.num_experts = len(keep)
        moe.gate.weight.data = moe.gate.weight.data[keep]
        hidden = layer(hidden, **kwargs)  # sequential: the next layer sees the merged one
        all_groups.append(sorted(groups, key=lambda group: group[0]))
    return all_groups
