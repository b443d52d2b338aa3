"""What a conversion did, as the pipeline passes it on: each MoE layer's result, the run as a
whole, and how it computed (for hcconvert.json, the model card, the summary and resuming)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..resources import StageTimer
from .plan import Plan


@dataclass
class LayerResult:
    layer: int
    groups: list[list[int]]
    counts: list[float]  # top-k selections per original expert
    logit_mean: list[float]  # mean router logit per original expert
    tokens: int
    choice: str | None = None  # with --method auto: the candidate this layer kept
    fit: dict | None = None  # with layer_fit: held-out layer-output errors (FitReport)
    # Quantized experts written back: the requantization error (requantization_record).
    requantization: dict | None = None
    # With --method auto: each candidate's held-out errors by name (FitReport.to_json).
    candidates: dict | None = None


@dataclass
class Conversion:
    """What a conversion did, for hcconvert.json, the model card and the summary."""

    source: str
    out: Path
    plan: Plan
    layers: list[LayerResult] = field(default_factory=list)
    timer: StageTimer = field(default_factory=StageTimer)
    shared_seconds: float = 0.0  # of timer's: the pass shared with other outputs (compare)
    # A Hub source downloaded just in time: the most of its shards the HF cache held at once
    # (None for a local directory; 0 when every shard was cached already).
    source_peak_bytes: int | None = None


@dataclass
class RunRecord:
    """What only the pipeline knows about a run, for hcconvert.json: the device it ran on,
    the compute dtype, the expert-statistics kernel (triton or torch); None where unsaid."""

    device: str | None = None
    dtype: str | None = None
    kernel: str | None = None
