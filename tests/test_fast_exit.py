"""The console script's exit (cli.console_main): after the command, the atexit handlers and the
flush of stdout and stderr, then os._exit without the interpreter's teardown; the normal exit
where a non-daemon thread still runs, the exit code is a string, or an exception escapes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from hcconvert import __version__

ROOT = Path(__file__).resolve().parents[1]

# os._exit wrapped so that a run records that it took the fast way out, and with which code.
SPY = """
import os
_real_exit = os._exit
def _spy(code):
    open({marker!r}, "w").write(str(code))
    _real_exit(code)
os._exit = _spy
"""


def run_entry(tmp_path, *args, before=""):
    """Run console_main in a subprocess (offline), the code `before` just before it; returns
    the completed process and the code os._exit was called with (None: the normal exit)."""
    marker = tmp_path / "fast_exit_code"
    script = (SPY.format(marker=str(marker)) + "import hcconvert.cli.main\n" + before
              + "\nhcconvert.cli.main.console_main()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONUNBUFFERED", None)  # stdout block-buffered, as a pipe has it by default
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)
    return done, int(marker.read_text()) if marker.exists() else None


def test_user_error_exits_fast_with_code_2(tmp_path):
    done, fast_code = run_entry(tmp_path, "inspect", tmp_path / "nope")
    assert done.returncode == 2 and fast_code == 2, done.stderr
    assert done.stderr.splitlines() == [f"hcconvert: error: source {tmp_path / 'nope'}: "
                                        "no such directory"], done.stderr


def test_version_exits_fast_with_stdout_flushed(tmp_path):
    done, fast_code = run_entry(tmp_path, "--version")
    assert done.returncode == 0 and fast_code == 0, done.stderr
    assert done.stdout == f"hcconvert, version {__version__}\n"


def test_atexit_handlers_run_then_stdout_is_flushed(tmp_path):
    """click flushes what it echoes; what an atexit handler prints is flushed by the exit."""
    ran = tmp_path / "atexit_ran"
    before = (f"import atexit, pathlib\natexit.register(pathlib.Path({str(ran)!r}).touch)\n"
              "atexit.register(print, 'printed at exit')")
    done, fast_code = run_entry(tmp_path, "--version", before=before)
    assert done.returncode == 0 and fast_code == 0, done.stderr
    assert ran.exists()
    assert done.stdout == f"hcconvert, version {__version__}\nprinted at exit\n"


def test_live_thread_takes_the_normal_exit(tmp_path):
    wrote = tmp_path / "thread_wrote"
    before = f"""
import pathlib, threading, time
def work():
    time.sleep(0.5)
    pathlib.Path({str(wrote)!r}).write_text("done")
threading.Thread(target=work).start()
"""
    done, fast_code = run_entry(tmp_path, "--version", before=before)
    assert done.returncode == 0 and fast_code is None, done.stderr
    assert wrote.read_text() == "done"


def test_string_code_and_exceptions_take_the_normal_exit(tmp_path):
    """A KeyboardInterrupt escaping ends the process by SIGINT, as without console_main."""
    for body, code, message in (("sys.exit('stopped here')", 1, "stopped here"),
                                ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
                                ("raise KeyboardInterrupt", -signal.SIGINT, "KeyboardInterrupt")):
        before = f"import sys\ndef main():\n    {body}\nhcconvert.cli.main.main = main"
        done, fast_code = run_entry(tmp_path, before=before)
        assert done.returncode == code and fast_code is None, done.stderr
        assert message in done.stderr


def test_c_level_output_is_flushed(tmp_path):
    """What a C library printf-ed into a pipe (block-buffered by C's stdio) still arrives."""
    before = "import ctypes\nctypes.CDLL(None).printf(b'from C\\n')"
    done, fast_code = run_entry(tmp_path, "--version", before=before)
    assert done.returncode == 0 and fast_code == 0, done.stderr
    assert "from C" in done.stdout


def test_an_interrupted_conversion_exits_fast_with_128_plus_the_signal(tmp_path):
    """run_guarded turns the interrupt into one line and exit code 130 (SIGINT); the fast
    exit keeps both."""
    before = ("import hcconvert.pipeline.preflight as preflight\n"
              "def interrupted(*args, **kwargs):\n"
              "    raise KeyboardInterrupt\npreflight.plan_from_headers = interrupted")
    source = tmp_path / "src"
    source.mkdir()
    done, fast_code = run_entry(tmp_path, source, "--experts", "2", "--calib", __file__,
                                "--out", tmp_path / "out", before=before)
    assert done.returncode == 128 + signal.SIGINT and fast_code == 128 + signal.SIGINT
    assert done.stderr.splitlines()[-1].startswith("hcconvert: error: interrupted by SIGINT")
