"""CLI conventions: --help/--version for every command, exit codes, and the stdin/stdout pipe contract."""

import subprocess

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
