"""The time estimate (pipeline/cost.py): what it counts where, and what --dry-run prints."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
from checkpoints import save_tiny_mixtral
from cli_runs import run

from hcconvert.cli.report import estimates
from hcconvert.methods import layerfit
from hcconvert.pipeline import cost
from hcconvert.pipeline.options import ConvertOptions

# Mixtral-8x7B's experts at the default calibration (the primal form) and at 2048 tokens (the
# dual form)
MIXTRAL = SimpleNamespace(hidden=4096, ffn=14336, num_experts=8, top_k=2)
RATES = cost.Rates(products=100e12, fp32_products=10e12, factorisations=5e12, copies=1e11,
                   reads=3e9, matching=1e-10)


@pytest.mark.parametrize("tokens", [65536, 2048])
def test_the_fits_products_feeding_its_solves_run_in_fp32_on_a_cpu_only(tokens):
    """On a GPU every product with the activations runs in the compute dtype (fp32
    accumulation); on the CPU those feeding a solve are widened to fp32, the rounded ones
    (outputs, the fitted projection) stay: the same FLOPs, more of them at the fp32 rate."""
    assert layerfit.dual_form(layerfit.fit_tokens_per_expert(tokens, 2, 4), 14336) == (
        tokens == 2048)
    on_gpu = cost._fit_work(MIXTRAL, 4, tokens, 2, gpu=True)
    on_cpu = cost._fit_work(MIXTRAL, 4, tokens, 2, gpu=False)
    assert on_cpu.products + on_cpu.fp32_products == pytest.approx(
        on_gpu.products + on_gpu.fp32_products)
    assert on_cpu.fp32_products > on_gpu.fp32_products
    # what stays in the compute dtype on the CPU: at least the outputs before the fit
    n = layerfit.fit_tokens_per_expert(tokens, 2, 4)
    assert on_cpu.products >= 4 * 2 * n * 14336 * 4096


def test_the_fit_efficiency_scales_the_fits_phases_alone():
    options = ConvertOptions(experts=4, method="auto", seq_len=2048)
    full = cost.layer_seconds(MIXTRAL, options, RATES, 2, True)
    half = cost.layer_seconds(MIXTRAL, options,
                              dataclasses.replace(RATES, fit_efficiency=0.5), 2, True)
    assert any(phase.startswith("fit ") for phase in full)
    for phase, seconds in full.items():
        expected = 2 * seconds if phase.startswith("fit ") else seconds
        assert half[phase] == pytest.approx(expected)


def test_rates_timed_here_carry_the_fits_measured_efficiency():
    rates = cost.measured_rates(cost.torch.device("cpu"), cost.torch.float32)
    assert rates.fit_efficiency == cost.FIT_EFFICIENCY
    assert all(value > 0 for value in dataclasses.astuple(rates))


def test_dry_run_prints_the_estimate_and_the_fit_adds_to_it(tmp_path, calib_text):
    src = save_tiny_mixtral(tmp_path / "src")
    result = run(src, "--experts", 3, "--dry-run", "--calib", calib_text, "--calib-samples", 64,
                 "--seq-len", 64)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"time \(est\.\)\s+[0-9.]+ min on the cpu", result.stdout)
    options = {method: ConvertOptions(experts=3, method=method, calib=str(calib_text),
                                      calib_samples=64, seq_len=64, device="cpu")
               for method in ("auto", "prune")}
    minutes = {method: estimates(str(src), option)["minutes"]
               for method, option in options.items()}
    assert minutes["auto"] > minutes["prune"] > cost.START_SECONDS / 60


def test_a_fit_that_is_not_tried_costs_only_its_held_out_check():
    """Below MIN_FIT_TOKENS routed tokens per kept expert the fit is skipped (layerfit)."""
    few = cost._fit_work(MIXTRAL, 4, 256, 2, gpu=True)
    assert layerfit.fit_tokens_per_expert(256, 2, 4) < layerfit.MIN_FIT_TOKENS
    assert few.fp32_products == few.factorisations == few.copies == 0 < few.products
    assert few.seconds(RATES) < cost._fit_work(MIXTRAL, 4, 2048, 2, gpu=True).seconds(RATES) / 4
