"""Which correction bias a merged expert should get (docs/DESIGN.md): KL to the original on
tiny random DeepSeek-V3 models, HC-SMoE with each candidate rule in turn.

Run from the repository root: python bench/bench_router_bias.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import hcconvert.pipeline.reduction
from hcconvert.cli.demo import data_file
from hcconvert.eval.evaluate import evaluate
from hcconvert.methods.merging import dominant, member_weights, weighted_sum
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from family_models import CASES, save_family_model  # noqa: E402

SEEDS = (0, 1, 2)
EXPERTS = (6, 4)


def member_entry(rule: str, flat: torch.Tensor, group: list[int], counts: torch.Tensor):
    """The merged entry of one group under a rule; flat: [E, rows]."""
    if rule == "dominant":
        return flat[dominant(group, counts)]
    if rule == "largest":
        return flat[group].max(0).values
    if rule == "freq-avg":
        return weighted_sum(flat, group, member_weights(group, counts, "freq"))
    return torch.zeros_like(flat[0])  # "zero"


def bias_rule(rule: str):
    """A stand-in for router.reduce_router_bias that applies rule."""
    def reduce(bias, groups, counts):
        flat = bias.reshape(-1, bias.shape[-1]).T
        rows = torch.stack([member_entry(rule, flat, g, counts) for g in groups])
        return rows.T.reshape(*bias.shape[:-1], len(groups)).contiguous()
    return reduce


def main() -> None:
    calib, text = data_file("demo_calib.txt"), data_file("demo_eval.txt")
    rules = ("dominant", "largest", "freq-avg", "zero")
    print("| merged bias | " + " | ".join(f"8 -> {r}" for r in EXPERTS) + " |")
    results = {(rule, r): [] for rule in rules for r in EXPERTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            src = save_family_model(CASES["deepseek_v3"], Path(tmp) / f"src{seed}", seed=seed)
            for r in EXPERTS:
                for rule in rules:
                    hcconvert.pipeline.reduction.reduce_router_bias = bias_rule(rule)
                    out = Path(tmp) / f"out{seed}-{r}-{rule}"
                    convert(str(src), out, ConvertOptions(
                        experts=r, method="merge", calib=str(calib), calib_samples=8,
                        seq_len=64), progress=False)
                    results[rule, r].append(
                        evaluate(str(src), str(out), text, 64, 8, "cpu", progress=False).kl)
    for rule in rules:
        cells = [" ".join(f"{kl:.4f}" for kl in results[rule, r])
                 + f", mean {sum(results[rule, r]) / len(SEEDS):.4f}" for r in EXPERTS]
        print(f"| {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
