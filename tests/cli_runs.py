"""Running the CLI in tests: in-process (run) or as a subprocess (CLI), the arguments of a
small conversion, and the one error line a refusal must end with."""

import re
import sys

from click.testing import CliRunner

from hcconvert.cli.main import main

# The CLI as a subprocess runs it; the arguments follow.
CLI = [sys.executable, "-c", "from hcconvert.cli.main import main; main()"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def convert_args(src, out, calib, *extra):
    return (src, "--experts", 3, "--out", out, "--calib", calib, "--calib-samples", 2,
            "--seq-len", 32, *extra)


def assert_user_error(result, fragment):
    """Exit code 2 and one error line on stderr; besides it only warnings."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("hcconvert: error: "), result.stderr
    assert fragment in lines[0], lines[0]


def assert_one_error_line(code: int, stderr: str, fragment: str, expected_code: int = 2):
    """One error line, the last; besides it only progress bars and warnings."""
    assert code == expected_code, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in re.split(r"[\r\n]+", stderr.strip())
             if line.strip() and not re.match(r"(layers|eval):|warning: ", line)]
    assert len(lines) == 1 and lines[0].startswith("hcconvert: error: "), stderr
    assert stderr.rstrip().endswith(lines[0])
    assert fragment in lines[0], lines[0]
