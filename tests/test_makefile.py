"""Makefile: `make` alone lists the targets, one line each, instead of starting work."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_alone_lists_every_target_with_one_line():
    r = subprocess.run(["make", "--no-print-directory"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    targets = [line.split()[1] for line in lines]
    assert targets == ["help", "setup", "demo", "test", "test-gpu", "clean"]
    assert all(line.startswith("  make ") and len(line.split()) > 2 for line in lines)
    assert "-m venv" not in r.stdout and "pip install" not in r.stdout  # `make` alone used to build .venv
