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


def optional_packages():
    """(pip name, import name) of each package in requirements-test.txt."""
    lines = (ROOT / "requirements-test.txt").read_text().splitlines()
    names = [line.split("#")[0].split("==")[0].strip() for line in lines]
    return [(n, n.replace("-", "_")) for n in names if n]


@pytest.mark.parametrize("package,module", optional_packages())
def test_make_test_has_every_optional_package(package, module):
    """The tests of .zst, .parquet, --tensorboard and safetensors skip without their package. `make test` installs
    them, and says so with TRM_TEST_OPTIONAL=1: there a missing one fails here, instead of its tests skipping
    unnoticed in a green run."""
    import importlib.util
    import os

    if os.environ.get("TRM_TEST_OPTIONAL") != "1":
        pytest.skip("run outside `make test`: the optional packages may be absent")
    assert importlib.util.find_spec(module) is not None, f"{package} missing: pip install -r requirements-test.txt"


def test_make_test_declares_the_optional_packages_installed():
    assert "TRM_TEST_OPTIONAL=1 $(PY) -m pytest" in (ROOT / "Makefile").read_text()
    assert [p for p, _ in optional_packages()] == ["zstandard", "pyarrow", "tensorboard", "safetensors"]
