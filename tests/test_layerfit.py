"""Fitting the reduced layer to the original layer's output (layerfit.py), per-layer seeds,
and --method auto's record in hcconvert.json."""

import dataclasses
import json

import pytest
import torch
from checkpoints import save_tiny_mixtral

from hcconvert.methods import layerfit, lstsq
from hcconvert.methods.layerfit import (
    HOLDOUT_FRACTION,
    fit_down,
    fit_layer,
    layer_output,
    relative_error,
)
from hcconvert.methods.lstsq import gram_matrix, rounded_product, wide_product
from hcconvert.methods.statistics import LayerStats
from hcconvert.model.experts import Experts, RoutedExperts
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.metadata import command_line
from hcconvert.pipeline.options import ConvertOptions
from hcconvert.pipeline.recipes import AUTO_CANDIDATES
from hcconvert.pipeline.reduction import group_slice

# T tokens, H hidden, F expert ffn, E experts.
T, H, F, E = 2048, 24, 16, 8


def top2(router: torch.Tensor):
    """Mixtral's routing rule with this router: softmax, top-2, renormalised."""
    def route(x: torch.Tensor):
        weights, index = torch.softmax(x.float() @ router.float().T, -1).topk(2, dim=-1)
        return weights / weights.sum(-1, keepdim=True), index
    return route


@pytest.fixture(scope="module")
def layer():
    """Random tokens [T, H], a random router [E, H] and experts, and their routed output."""
    torch.manual_seed(0)
    x = torch.randn(T, H)
    router = torch.randn(E, H)
    experts = Experts(torch.randn(E, F, H) / H**0.5, torch.randn(E, F, H) / H**0.5,
                      torch.randn(E, H, F) / F**0.5)
    return x, router, experts, layer_output(x, experts, top2(router))


def kept(router, experts, index):
    return router[index], Experts(experts.gate[index], experts.up[index], experts.down[index])


def test_layer_output_is_the_models_routed_forward(layer):
    x, router, experts, target = layer
    weights, index = top2(router)(x)
    torch.testing.assert_close(target, RoutedExperts(experts)(x, index, weights))


def test_prune_then_compensate_lowers_the_error_on_the_calibration_tokens(layer):
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [0, 2, 5, 7])
    rule = top2(small_router)
    before = relative_error(layer_output(x, survivors, rule), target)
    down = fit_down(x, target, survivors, rule)
    fitted = Experts(survivors.gate, survivors.up, down)
    after = relative_error(layer_output(x, fitted, rule), target)
    assert after < 0.8 * before


def test_every_expert_kept_is_reproduced_exactly(layer):
    """Nothing dropped: the unfitted layer is already exact, and the fit leaves it so."""
    x, router, experts, target = layer
    down = fit_down(x, target, experts, top2(router))
    torch.testing.assert_close(down, experts.down, atol=1e-4, rtol=1e-4)


def test_experts_with_biases_are_reproduced_exactly(layer):
    """GPT-OSS's experts add a bias after the down projection: it is part of the layer's
    output, which the fit must count before it explains the rest."""
    x, router, experts, _ = layer
    biased = dataclasses.replace(experts, gate_bias=torch.randn(E, F), up_bias=torch.randn(E, F),
                                 down_bias=torch.randn(E, H))
    weights, index = top2(router)(x)
    target = RoutedExperts(biased)(x, index, weights)  # the model's forward, bias included
    torch.testing.assert_close(layer_output(x, biased, top2(router)), target)
    down = fit_down(x, target, biased, top2(router))
    torch.testing.assert_close(down, biased.down, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [layerfit.CHUNK_TOKENS, 300])
def test_what_the_fit_keeps_between_rounds_changes_nothing(layer, monkeypatch, chunk_tokens):
    """Activations and factored normal equations kept from one round to the next give the
    fit that recomputes them every round (nothing kept; and experts of several chunks)."""
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [0, 2, 5, 7])
    monkeypatch.setattr(layerfit, "CHUNK_TOKENS", chunk_tokens)
    kept_down = fit_down(x, target, survivors, top2(small_router))
    monkeypatch.setattr(layerfit, "FIT_KEEP_BYTES", 0)
    recomputed = fit_down(x, target, survivors, top2(small_router))
    torch.testing.assert_close(kept_down, recomputed, atol=0, rtol=0)


@pytest.mark.parametrize("tokens", [T, 300])  # experts with more tokens than neurons, and fewer
def test_the_dual_form_fits_what_the_primal_form_fits(layer, monkeypatch, tokens):
    """The dual form works on coefficients of AᵀC and never forms the change to the down
    projection until the end; its fit and held-out errors equal the primal form's."""
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [0, 2, 5, 7])
    x, target = x[:tokens], target[:tokens]
    monkeypatch.setattr(layerfit, "MIN_FIT_TOKENS", 16)
    found = {}
    for form in (True, False):
        monkeypatch.setattr(layerfit, "dual_form", lambda n, ffn, form=form: form)
        found[form] = fit_layer(x, target, survivors, top2(small_router))
    (dual, dual_report), (primal, primal_report) = found[True], found[False]
    assert dual_report.ridge == primal_report.ridge and dual_report.fitted
    assert dual_report.error_after == pytest.approx(primal_report.error_after, rel=1e-3)
    torch.testing.assert_close(dual.down, primal.down, atol=1e-4, rtol=1e-3)


def test_a_fit_in_half_precision_keeps_its_activations_there_and_fits_as_well(layer):
    """With the tokens and experts in bf16 (a GPU's compute dtype) the fit keeps A in bf16,
    half the bytes, and its products accumulate in fp32: the held-out error it reaches is
    the fp32 fit's to within bf16's rounding of the activations."""
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [1, 3, 4, 6])
    half = Experts(*(w.bfloat16() for w in (survivors.gate, survivors.up, survivors.down)))
    _, wide = fit_layer(x, target, survivors, top2(small_router))
    fitted, report = fit_layer(x.bfloat16(), target, half, top2(small_router))
    assert report.fitted and fitted.down.dtype == torch.bfloat16
    assert report.error_after == pytest.approx(wide.error_after, rel=0.05)
    routed = layerfit._routed(*top2(small_router)(x))
    routed[1].keep(x.bfloat16(), half, 1, [1 << 30])
    assert routed[1].kept.dtype == torch.bfloat16


def test_wide_products_accumulate_half_precision_operands_in_fp32():
    """On the CPU the operands are widened (the same sums as fp32 products of the rounded
    values); elsewhere torch.mm's out_dtype gives fp32 from half operands (checked here on
    the meta device, which has the kernel's signature and result type)."""
    a, b = torch.randn(64, 300).bfloat16(), torch.randn(300, 8)
    torch.testing.assert_close(wide_product(a, b), a.float() @ b.bfloat16().float(),
                               atol=0, rtol=0)
    meta = wide_product(a.to("meta"), b.to("meta"))
    assert meta.dtype == torch.float32 and meta.shape == (64, 8)


@pytest.mark.parametrize("columns", [1, 9, 10, 23])
def test_gram_matrix_multiplies_the_lower_blocks_only_and_mirrors_them(monkeypatch, columns):
    """Σ aᵀa over row blocks from the blocks on and below the diagonal (column blocks of 3,
    the last one partial or whole), equal to the full product and exactly symmetric; its FLOP
    count is the blocks' products: about half the full product's when there are many."""
    monkeypatch.setattr(lstsq, "GRAM_BLOCK", 3)
    parts = [torch.randn(rows, columns).bfloat16() for rows in (7, 1, 30)]
    full = sum(wide_product(a.T, a) for a in parts)
    out = gram_matrix(parts, columns, torch.device("cpu"))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, out.T)
    blocks = {1: [1], 9: [9, 6, 3], 10: [10, 7, 4, 1], 23: range(23, 0, -3)}[columns]
    products = sum(2 * 38 * rows * min(3, rows) for rows in blocks)
    assert lstsq.gram_flops(38, columns) == products
    assert lstsq.gram_flops(38, 3000) < 0.51 * 2 * 38 * 3000**2


def test_rounded_products_take_the_cpus_half_precision_kernel_and_are_wide_elsewhere():
    """Where a rounded result will do, the CPU multiplies half operands as they are (its
    matrix unit), the result in their dtype; fp32 operands, and any GPU, get wide_product."""
    a, b = torch.randn(64, 300).bfloat16(), torch.randn(300, 8)
    rounded = rounded_product(a, b)
    assert rounded.dtype == torch.bfloat16
    torch.testing.assert_close(rounded, a @ b.bfloat16(), atol=0, rtol=0)
    wide = wide_product(a, b)
    assert (rounded.float() - wide).norm() < 1e-2 * wide.norm()  # bf16's rounding
    torch.testing.assert_close(rounded_product(a.float(), b), a.float() @ b, atol=0, rtol=0)
    meta = rounded_product(a.to("meta"), b.to("meta"))
    assert meta.dtype == torch.float32 and meta.shape == (64, 8)


def test_held_out_error_is_reported_and_the_fit_kept_only_when_it_helps(layer):
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [1, 3, 4, 6])
    fitted, report = fit_layer(x, target, survivors, top2(small_router))
    assert report.fitted and report.error_after < report.error_before
    assert report.error == report.error_after
    # The held-out quarter wants exactly the unfitted layer's output: the fit can only lose.
    cut = int(T * (1 - HOLDOUT_FRACTION))
    unfitted = layer_output(x[cut:], survivors, top2(small_router))
    contrary = torch.cat((target[:cut], unfitted))
    same, refused = fit_layer(x, contrary, survivors, top2(small_router))
    assert refused.error_after > refused.error_before and not refused.fitted
    assert same is survivors


def test_too_few_tokens_per_kept_expert_keep_the_unfitted_experts_and_say_why(layer):
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [1, 3, 4, 6])
    few = 2 * layerfit.MIN_FIT_TOKENS  # 1.5 MIN_FIT_TOKENS after the held-out split, top-2 of 4
    same, report = fit_layer(x[:few], target[:few], survivors, top2(small_router))
    assert same is survivors and not report.fitted and report.error_after is None
    assert "fit tokens per kept expert, fewer than" in report.skipped
    assert report.to_json()["skipped"] == report.skipped


def test_random_grouping_draws_a_different_partition_in_each_layer():
    stats = LayerStats(tokens=1, counts=torch.ones(8), logit_mean=torch.zeros(8),
                       selected=torch.zeros(1, 2))
    reduction = ConvertOptions(experts=4, method="random").reductions()["random"]
    partitions = [group_slice(reduction, 42, layer, stats, slice(0, 8), 4) for layer in range(4)]
    assert len({json.dumps(p) for p in partitions}) > 1


def test_auto_records_each_layers_choice_and_error(tmp_path, calib_text, monkeypatch):
    monkeypatch.setattr(layerfit, "MIN_FIT_TOKENS", 16)  # a tiny calibration
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(experts=2, method="auto", calib=str(calib_text), calib_samples=4,
                             seq_len=64)
    convert(str(src), tmp_path / "out", options, progress=False)
    layers = json.loads((tmp_path / "out" / "hcconvert.json").read_text())["layers"]
    assert layers and all(entry["choice"] in AUTO_CANDIDATES for entry in layers)
    for entry in layers:
        fit = entry["layer_fit"]
        assert 0 <= min(fit["error_unfitted"], fit["error_fitted"]) < 1


def test_the_model_cards_command_spells_the_fit_as_a_switch(tmp_path):
    options = ConvertOptions(experts=4, method="prune", prune_by="output", layer_fit=True)
    line = command_line("src", options, tmp_path / "out")
    assert line == ("hcconvert src --experts 4 --method prune --prune-by output --layer-fit "
                    "--out out")


@pytest.mark.parametrize("ffn", [F, 80 * F])  # the primal form, and the dual (n < F)
def test_parking_the_best_ridges_state_leaves_the_fit_as_it_was(layer, monkeypatch, ffn):
    """On a GPU the best ridge's state waits on the host while the next is made; parked (here
    as a copy on the CPU itself) the fit chooses and returns the same."""
    x, router, experts, target = layer
    small_router, survivors = kept(router, experts, [1, 3, 4, 6])
    if ffn != F:  # as wide, the same layer's output: the fit has something to find
        survivors = Experts(*(torch.cat([w] * 80, dim=axis) / scale for w, axis, scale in (
            (survivors.gate, 1, 1), (survivors.up, 1, 1), (survivors.down, 2, 80))))
    fitted, report = fit_layer(x, target, survivors, top2(small_router))
    monkeypatch.setattr(layerfit, "PARKING", {"cpu": torch.device("cpu")})
    parked, parked_report = fit_layer(x, target, survivors, top2(small_router))
    assert layerfit.dual_form(layerfit.fit_tokens_per_expert(T, 2, 4), ffn) == (ffn != F)
    assert report.fitted and parked_report == report
    torch.testing.assert_close(parked.down, fitted.down, atol=0, rtol=0)


# 48 fit tokens per neuron, above the threshold or below it; a noisy target wants the
# largest ridge, so there the second ridge tried beats the middle one and the third is not tried
@pytest.mark.parametrize(("threshold", "noise"), [(25, 0.0), (100, 3.0)])
def test_the_ridges_go_from_the_middle_to_the_side_the_tokens_favour(layer, monkeypatch,
                                                                     threshold, noise):
    """fit_layer tries the middle ridge, then the smallest (many fit tokens per neuron) or
    the largest (few), and the third only where the second did not beat the middle one;
    it keeps the lowest held-out error of those tried."""
    x, router, experts, target = layer
    target = target + noise * target.std() * torch.randn_like(target)
    small_router, survivors = kept(router, experts, [1, 3, 4, 6])
    monkeypatch.setattr(layerfit, "RIDGE_TOKENS_PER_NEURON", threshold)
    assert layerfit.fit_tokens_per_expert(T, 2, 4) / F == 48
    tried, solve = [], layerfit._DownFit.solve

    def recorded(self, ridge, rounds=layerfit.ROUNDS, start=None):
        if start is None:
            tried.append(ridge)
        return solve(self, ridge, rounds, start)
    monkeypatch.setattr(layerfit._DownFit, "solve", recorded)
    _, report = fit_layer(x, target, survivors, top2(small_router))
    order = list(tried)
    small, middle, large = layerfit.RIDGES
    assert order[:2] == [middle, small if threshold == 25 else large]
    errors = {}
    for ridge in layerfit.RIDGES:  # each ridge's held-out error after one round, alone
        monkeypatch.setattr(layerfit, "RIDGES", (ridge,) * 3)
        monkeypatch.setattr(layerfit, "ROUNDS", 1)
        errors[ridge] = fit_layer(x, target, survivors, top2(small_router))[1].error_after
    assert len(order) == (2 if errors[order[1]] < errors[middle] else 3) == (2 if noise else 3)
    assert report.ridge == min(order, key=errors.get)


@pytest.mark.parametrize("tokens", [T, 300])  # the primal form, and the dual (n < F)
def test_what_the_fit_holds_stays_within_the_estimates_bound(layer, tokens):
    """The --dry-run estimate counts layerfit.fit_bytes for the Gram matrices, the
    activations the fit keeps and two states (the best ridge's and the next one's); here F is
    raised so that 300 tokens give the dual form."""
    x, router, _, _ = layer
    wide = Experts(torch.randn(4, 4 * F * 10, H) / H**0.5, torch.randn(4, 4 * F * 10, H) / H**0.5,
                   torch.randn(4, H, 4 * F * 10) / F**0.5)
    rule = top2(router[:4])
    cut = int(tokens * (1 - HOLDOUT_FRACTION))
    fit = layerfit._DownFit(x[:cut], torch.randn(cut, H), wide, layerfit._routed(*rule(x[:cut])))
    held = sum(s.system.gram.numel() * 4 for s in fit.systems.values()) + sum(
        r.kept.numel() * r.kept.element_size() for r in fit.routed.values() if r.kept is not None)
    largest = max(s.system.gram.numel() * 4 for s in fit.systems.values())
    dual = [isinstance(s, layerfit._Dual) for s in fit.systems.values()]
    assert any(dual) == (tokens == 300)
    state = fit.solve(layerfit.RIDGES[0], rounds=1)
    states = 2 * 4 * (sum(c.numel() for c in state.changes.values()) + state.predicted.numel())
    down = 2 * 4 * wide.down.numel()  # the fitted projections and their prior, fp32
    assert 0 < held + largest + states + down <= layerfit.fit_bytes(tokens, 2, 4, 4 * F * 10, H, 4)
