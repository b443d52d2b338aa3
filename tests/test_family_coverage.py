"""Every MoE configuration of the installed transformers is either a family hcconvert reduces
or refused with a reason, so the next one transformers adds is noticed here; README's
families tables say the same as the family table, word for word for the refusals."""

import json

import pytest
from moe_configurations import model_type_cell, moe_model_types, readme_table

from hcconvert.errors import UserError
from hcconvert.model.families import FAMILIES, family_for
from hcconvert.model.refused import REFUSED

SUPPORTED_HEADING = "## Supported model families"
REFUSED_HEADING = "### Refused model types"


def test_every_moe_configuration_is_supported_or_refused():
    known = set(FAMILIES) | set(REFUSED)
    unknown = sorted(moe_model_types() - known)
    assert not unknown, (f"transformers has MoE model types hcconvert neither supports nor "
                         f"refuses: {unknown}; add a family entry and a case "
                         "(tests/family_models.py), or a reason to model/refused.py")


def test_the_scan_finds_known_families():
    """The source scan sees fused-expert families, per-expert ones and configuration-only
    packages, so an empty result cannot pass the test above."""
    assert {"mixtral", "qwen3_moe", "gpt_oss", "llama4", "switch_transformers",
            "sarvam_moe"} <= moe_model_types()


def test_no_model_type_is_both_supported_and_refused():
    assert not set(FAMILIES) & set(REFUSED)


def test_readme_lists_the_supported_families():
    rows = readme_table(SUPPORTED_HEADING)
    listed = [model_type_cell(row[0]) for row in rows]
    assert sorted(listed) == sorted(FAMILIES)


def test_readme_lists_every_refusal_with_its_reason():
    rows = readme_table(REFUSED_HEADING)
    assert {model_type_cell(row[0]): row[1] for row in rows} == REFUSED
    assert len(rows) == len(REFUSED)


@pytest.mark.parametrize("model_type", ["jetmoe", "switch_transformers"])
def test_refused_model_types_say_why(model_type):
    with pytest.raises(UserError) as refusal:
        family_for({"model_type": model_type})
    assert str(refusal.value) == (f"model_type '{model_type}' is not supported: "
                                  f"{REFUSED[model_type]}")


def test_refusal_reaches_inspect_and_dry_run(tmp_path):
    """A refused model type ends in one line naming the reason, before any weight is read:
    the checkpoint holds no weights at all."""
    from click.testing import CliRunner

    from hcconvert.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "zaya"}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    inspected = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert "'zaya': not supported" in inspected.output and REFUSED["zaya"] in inspected.output
    dry = CliRunner().invoke(main, [str(tmp_path), "--experts", "4", "--out",
                                    str(tmp_path / "o"), "--dry-run"])
    assert dry.exit_code == 2
    assert REFUSED["zaya"] in dry.output
