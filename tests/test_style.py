"""The code style the project agreed on (pyproject.toml [tool.ruff]): lint and format, checked with every test run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, (
        f"`ruff {' '.join(command)}` found problems (run `ruff check --fix . && ruff format .`):\n"
        + out.stdout[-5000:]
        + out.stderr[-2000:]
    )
