"""Shared fixtures. The helpers tests share live in modules of their own (checkpoints,
cli_runs, parity, reference_codecs, expert_sets, family_models, quantized_models, fake_hub),
never in a test module or here.

Triton kernels run under the interpreter on machines without CUDA; the variable must be set
before triton decorates any kernel, hence here, before the package is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from hcconvert.cli.demo import data_file  # noqa: E402


@pytest.fixture(autouse=True)
def restore_hub_offline_switch(monkeypatch):
    """The CLI switches huggingface_hub to offline mode when the Hub is unreachable; undo that
    after each test, so no test depends on the ones before it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        huggingface_hub.constants.HF_HUB_OFFLINE)


@pytest.fixture(autouse=True)
def cpu_without_matrix_unit(monkeypatch):
    """auto computes in fp32 on the CPU in every test, as on a CPU without AMX: the results
    must not depend on the machine running the suite (tests that want bf16 ask for it)."""
    from hcconvert.model import decoder

    monkeypatch.setattr(decoder, "half_is_fast", lambda dtype: False)


@pytest.fixture
def calib_text() -> Path:
    return data_file("demo_calib.txt")


@pytest.fixture
def eval_text() -> Path:
    return data_file("demo_eval.txt")
