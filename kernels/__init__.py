"""Triton kernels for hcconvert (installed as ``hcconvert.kernels``).

Importing this package does not import triton; import the submodule you need, e.g.
``from hcconvert.kernels.expert_sums import expert_act_sums``.
"""
