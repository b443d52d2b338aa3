"""The --dry-run time estimate (pipeline/cost.py) for whole real models on devices not here.

An H100 and a 24 GB workstation GPU (RTX 4090) get rates from their published peaks, derated
as stated below, because no GPU was lent to this project: these rows are projections, not
measurements.
docs/BENCHMARKS.md ("The default's cost at real shapes") prints the table.

    python bench/estimate_models.py
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hcconvert.pipeline.cost import Rates, measured_rates, run_seconds
from hcconvert.pipeline.options import ConvertOptions

# name: hidden, expert ffn, experts, top-k, MoE layers, experts kept (half)
MODELS = {
    "Mixtral-8x7B": (4096, 14336, 8, 2, 32, 4),
    "Qwen3-30B-A3B": (2048, 768, 128, 8, 48, 64),
    "DeepSeek-V3": (7168, 2048, 256, 8, 58, 128),
}

T = 10**12
# Published dense peaks at half of them achieved (large products reach 60-70 % of peak; the
# fit's and merges' smaller ones less; the compute dtype's with fp32 accumulation, the 4090's
# bf16 rate with it); copies at half the memory bandwidth (a read and a write); reads: a
# 3 GB/s NVMe, the weights' first touch. Factorisations: torch.linalg.cholesky (cuSOLVER)
# factored an fp32 4096² matrix in 2.37 ms on an L40S, the 4090's architecture with a similar
# fp32 peak (ml-explore/mlx#4262): 9.7 TFLOP/s, taken for both, though larger matrices go
# faster. The matching runs in scipy on the host: the rate measured here.
GPUS = {
    "H100 SXM (80 GB)": dict(products=989 * T / 2, fp32_products=67 * T / 2,
                             factorisations=9.7 * T, copies=3.35e12 / 2, reads=3e9),
    "RTX 4090 (24 GB)": dict(products=165 * T / 2, fp32_products=82.6 * T / 2,
                             factorisations=9.7 * T, copies=1.0e12 / 2, reads=3e9),
}


def main() -> None:
    # Only the matching's rate is this machine's (the host runs it); the whole models on this
    # CPU are not projected: its Cholesky rate, timed at n = 1024, is far below what a
    # factorisation of Mixtral's 14336² systems reaches.
    here = measured_rates(torch.device("cpu"), torch.float32)
    devices = {name: (Rates(matching=here.matching, **rates), 2, True)
               for name, rates in GPUS.items()}
    print("| model | device | hc-smoe (min) | auto (min) | auto / hc-smoe |")
    print("| --- | --- | --- | --- | --- |")
    for model, (hidden, ffn, experts, top_k, layers, kept) in MODELS.items():
        spec = SimpleNamespace(hidden=hidden, ffn=ffn, num_experts=experts, top_k=top_k)
        for device, (rates, element, gpu) in devices.items():
            # hcconvert's defaults: 32 samples of 2048 tokens
            options = {method: ConvertOptions(experts=kept, method=method, seq_len=2048)
                       for method in ("hc-smoe", "auto")}
            minutes = {method: run_seconds(spec, option, rates, element, gpu, layers) / 60
                       for method, option in options.items()}
            print(f"| {model} | {device} | {minutes['hc-smoe']:.1f} | {minutes['auto']:.1f} | "
                  f"{minutes['auto'] / minutes['hc-smoe']:.2f} |")


if __name__ == "__main__":
    main()
