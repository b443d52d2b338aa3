"""Which model types the installed transformers builds with routed experts, read from its
source (no model is built), and README's families tables, for tests/test_family_coverage.py.

A package of transformers.models is a MoE package when one of its modeling files assigns
`self.experts` (every MoE block of transformers 5 does) or its configuration declares an
expert count (configuration-only packages that reuse another family's modeling code, as
sarvam_moe reuses GLM-4.5's). Its model types are those the auto classes map to a model.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

EXPERT_COUNT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
README = Path(__file__).resolve().parents[1] / "README.md"


@functools.cache
def moe_model_types() -> frozenset[str]:
    """Every model type of the installed transformers whose package has routed experts and
    which some auto class (causal LM, image-text-to-text, seq2seq, ...) builds a model for."""
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    models = Path(transformers.__file__).parent / "models"
    packages = {package.name for package in models.iterdir()
                if package.is_dir() and _has_routed_experts(package)}
    mappings = [getattr(modeling_auto, name) for name in dir(modeling_auto)
                if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES")
                and name != "MODEL_MAPPING_NAMES"]
    return frozenset(model_type for model_type in configuration_auto.CONFIG_MAPPING_NAMES
                     if configuration_auto.model_type_to_module_name(model_type) in packages
                     and any(model_type in mapping for mapping in mappings))


def _has_routed_experts(package: Path) -> bool:
    """Parsed only where the text can match: parsing every package's source takes 20 s."""
    return (any(_assigns_experts(ast.parse(text)) for text in _texts(package, "modeling_*.py")
                if "self.experts" in text)
            or any(_declares_expert_count(ast.parse(text))
                   for text in _texts(package, "configuration_*.py")
                   if any(key in text for key in EXPERT_COUNT_KEYS)))


def _texts(package: Path, pattern: str) -> list[str]:
    return [path.read_text() for path in package.glob(pattern)]


def _assigns_experts(tree: ast.AST) -> bool:
    return any(isinstance(target, ast.Attribute) and target.attr == "experts"
               and isinstance(target.value, ast.Name) and target.value.id == "self"
               for node in ast.walk(tree) if isinstance(node, ast.Assign)
               for target in node.targets)


def _declares_expert_count(tree: ast.AST) -> bool:
    """A config dataclass field or __init__ argument named like an expert count."""
    return any((isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id in EXPERT_COUNT_KEYS)
               or (isinstance(node, ast.arg) and node.arg in EXPERT_COUNT_KEYS)
               for node in ast.walk(tree))


def readme_table(heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table below README's `heading` line."""
    lines = README.read_text().splitlines()
    start = lines.index(heading)
    rows, inside = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            inside = True
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not re.fullmatch(r"-+", cells[0].replace(" ", "")):
                rows.append(cells)
        elif inside:
            break
    return rows[1:]  # without the header row


def model_type_cell(cell: str) -> str:
    """`qwen3_moe` -> qwen3_moe."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"README's first column names a model_type in backquotes: {cell!r}"
    return match.group(1)
