"""CLI conventions: --help/--version for every command, exit codes, and the stdin/stdout pipe contract."""

import subprocess
import sys

import pytest

from tests.conftest import script

COMMANDS = ["pass-pretrain", "extract-features", "cluster", "refine-labels", "finetune", "evaluate",
            "inspect-data"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_and_version(cmd):
    proc = subprocess.run([script(cmd), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "Example" in proc.stdout, f"{cmd} --help lacks a worked example"
    ver = subprocess.run([script(cmd), "--version"], capture_output=True, text=True)
    assert ver.returncode == 0 and "0.1.0" in ver.stdout


def test_pipe_features_path_into_inspect_data(features_file):
    # a real shell pipe: the path arrives on stdin
    proc = subprocess.run(f"echo {features_file} | {script('inspect-data')}", shell=True, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rows (N): 12" in proc.stdout and "parts: float32 (12, 3, 4)" in proc.stdout


def test_missing_stdin_is_a_usage_error():
    proc = subprocess.run([script("inspect-data")], input="", capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no dataset spec or file given")


def test_bad_option_exits_2():
    proc = subprocess.run([script("inspect-data"), "--device", "tpu", "x"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_worker_wrapped_input_error_is_one_line():
    from partreid.cli._common import one_line
    from partreid.common.errors import InputError

    wrapped = InputError("Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1\npartreid.common.errors.InputError: /d/a.jpg: cannot identify image")
    assert one_line(wrapped) == "/d/a.jpg: cannot identify image"
    assert one_line(InputError("plain")) == "plain"


def test_strict_unreadable_image_exits_2_with_one_line(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 64), (i * 60, 0, 0)).save(tmp_path / f"0001_c1_{i:04d}.jpg")
    (tmp_path / "0002_c2_0000.jpg").write_bytes(b"not a jpeg")
    base = [script("extract-features"), "-c", "random:vit_tiny", "-d", f"folder:{tmp_path}", "--image-size", "64x32",
            "--device", "cpu", "--workers", "1", "--out"]
    proc = subprocess.run(base + [str(tmp_path / "s.h5"), "--strict"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-1500:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "0002_c2_0000.jpg" in last and "Traceback" not in proc.stderr
    ok = subprocess.run(base + [str(tmp_path / "ok.h5")], capture_output=True, text=True)  # default: skip + count
    assert ok.returncode == 0, ok.stderr[-1500:]
    from partreid.common.h5io import read_features

    f = read_features(tmp_path / "ok.h5")
    assert len(f) == 3 and f.attrs["num_skipped"] == 1 and "0002_c2_0000.jpg" in ok.stderr


def test_umbrella_command_lists_and_runs_every_command():
    import subprocess

    from partreid.cli.umbrella import COMMANDS

    listing = subprocess.run([script("partreid"), "--help"], capture_output=True, text=True)
    assert listing.returncode == 0
    for name in COMMANDS:
        assert name in listing.stdout
    for name in ("cluster", "inspect-data"):
        proc = subprocess.run([script("partreid"), name, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and f"Usage: partreid {name}" in proc.stdout
    bogus = subprocess.run([script("partreid"), "no-such-command"], capture_output=True, text=True)
    assert bogus.returncode == 2


def run_guarded(body: str, sig: str, rc: int, before: str = "") -> subprocess.CompletedProcess:
    """Run ``body`` as a ``guarded`` click command in a fresh interpreter (``{sig}`` in it names the signal);
    check its exit code and return the finished process."""
    source = ("import os, signal, time\nimport click\nfrom partreid.cli._common import guarded\n"
              f"{before}\n@click.command()\n@guarded\ndef main():\n{body}\nmain()\n").replace("{sig}", sig)
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    return proc


SIGNALS = pytest.mark.parametrize("sig,rc,said", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])


@SIGNALS
def test_signal_raised_where_python_swallows_it_still_stops_the_command(sig, rc, said):
    """A signal whose exception lands in code that cannot propagate it (a ``__del__``, an at-fork callback) is
    delivered again: the command stops with its signal exit code instead of running to completion."""
    proc = run_guarded("""
    class Swallowing:
        def __del__(self):  # like logging's at-fork callback while a DataLoader worker starts
            os.kill(os.getpid(), signal.{sig})
    Swallowing()
    for _ in range(300):
        time.sleep(0.01)
    print("ran to completion")
""", sig, rc)
    assert "ran to completion" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {said}")
    assert "Exception ignored" not in proc.stderr


@SIGNALS
def test_signal_inside_a_constructor_leaves_the_error_line_last(sig, rc, said):
    """The half-built object's ``__del__`` failure as the process ends stays out of stderr: the one-line error is
    the last line and no traceback follows it."""
    proc = run_guarded("    HalfBuilt()\n", sig, rc, before="""
class HalfBuilt:  # like a DataLoader iterator stopped inside __init__
    def __init__(self):
        os.kill(os.getpid(), signal.{sig})
        self.ready = True
    def __del__(self):
        assert self.ready
""")
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@SIGNALS
def test_signal_reworded_by_a_library_still_ends_as_that_signal(sig, rc, said):
    proc = run_guarded("""
    try:  # like h5py, whose type-conversion callback turns the handler's exception into a TypeError
        os.kill(os.getpid(), signal.{sig})
    except BaseException:
        raise TypeError("Operation not defined for data type class") from None
    print("ran to completion")
""", sig, rc)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {said}")
    assert "internal error" not in proc.stderr and "TypeError" not in proc.stderr
