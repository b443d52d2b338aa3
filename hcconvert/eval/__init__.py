"""Evaluation: a reduced model against its original (perplexity, KL, agreement, greedy
continuations), and several reductions compared from one pass."""
