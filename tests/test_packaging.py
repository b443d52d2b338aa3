"""The repository's kernels/ folder is installed as hcconvert.kernels and never stands in for
an installed package named `kernels` (transformers imports the PyPI one): python -c, -m and
pytest put the working directory first on sys.path, so from the repository root a regular
package there would shadow it (transformers 5.25 then failed to import at all)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """code run by this interpreter with cwd first on sys.path, as `python -m` does."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(params=["repository root", "elsewhere"])
def cwd(request, tmp_path) -> Path:
    return ROOT if request.param == "repository root" else tmp_path


def test_top_level_kernels_is_never_the_repository_folder(cwd):
    result = python("import importlib.util, sys\n"
                    "spec = importlib.util.find_spec('kernels')\n"
                    "print(spec.origin if spec and spec.origin else '')", cwd)
    assert result.returncode == 0, result.stderr
    origin = result.stdout.strip()
    assert not origin or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin


def test_kernel_module_is_not_importable_under_a_top_level_name(cwd):
    result = python("import kernels.expert_sums", cwd)
    assert result.returncode != 0
    assert "Error" in result.stderr.splitlines()[-1]


def test_transformers_kernel_integration_imports(cwd):
    """What failed on a fresh clone: transformers' hub kernels, then the package's kernel."""
    result = python("import transformers.integrations.hub_kernels\n"
                    "from hcconvert.kernels.expert_sums import expert_act_sums_torch\n"
                    "from hcconvert.model.decoder import Decoder", cwd)
    assert result.returncode == 0, result.stderr[-2000:]
