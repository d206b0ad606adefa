"""The repository passes its own lint rules (pyproject.toml, [tool.ruff.lint])."""

import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it comes with the test extra)")
def test_ruff_finds_nothing():
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                        "--no-cache", REPO], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
