"""The reduction methods, on one MoE layer's statistics: grouping, pruning, merging,
neuron alignment, the reduced router, least squares and the layer fit."""
