"""A non-editable install works from any folder: the wheel carries the package and its config tree.

The wheel is built from a copy of the checkout (no build/ leftovers) and installed with ``pip --target`` into an
empty folder; the test's Python then runs the installed ``fidmed`` command from another folder, with this
environment's site-packages providing the dependencies (torch, hydra, ... : a full fresh environment is 6 GB) and
the installed copy shadowing the editable checkout (asserted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from helpers.images import png_folder

IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "outputs",
    "*.egg-info",
    "__pycache__",
    ".whl",
    ".pytest_cache",
    "wandb",
    "benchmarks",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=IGNORE, symlinks=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (wheel,) = (root / "dist").glob("fidmed-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return root


def _fidmed(installed: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(installed / "site"),
        "HF_HUB_OFFLINE": "1",
        "FIDMED_OFFLINE": "1",
        "FIDMED_WEIGHTS": str(installed / "weights"),
    }
    elsewhere = installed / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(installed / "site" / "bin" / "fidmed"), *args],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_the_wheel_holds_the_config_tree(installed):
    conf = installed / "site" / "fidmed" / "conf"
    assert (conf / "config.yaml").is_file() and (conf / "experiment" / "paper.yaml").is_file()
    assert sorted(p.stem for p in (conf / "modality").glob("*.yaml")) == ["cardiac", "ct", "mri", "xray"]


def test_installed_fidmed_command_works_from_any_folder(installed):
    where = subprocess.run(
        [sys.executable, "-c", "import fidmed; print(fidmed.__file__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(installed / "site")},
        cwd=installed,
    )
    assert where.stdout.strip().startswith(str(installed / "site")), "the checkout, not the wheel, was imported"
    out = _fidmed(installed, "--help")
    assert out.returncode == 0 and "evaluate" in out.stdout and "prepare" in out.stdout, out.stderr
    out = _fidmed(installed, "weights", "list")
    assert out.returncode == 0 and "inception_tf" in out.stdout, out.stderr
    # an evaluation composes the packaged config tree (eval defaults, extractor nodes from the registry)
    png_folder(installed / "elsewhere" / "gen", 5, 1)
    png_folder(installed / "elsewhere" / "real", 6, 2)
    res = installed / "elsewhere" / "res.json"
    out = _fidmed(
        installed,
        "evaluate",
        "gen",
        "real",
        "--extractor",
        "resnet",
        "--weights",
        "random",
        "--device",
        "cpu",
        "--out",
        str(res),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert res.is_file() and np.isfinite(float(res.read_text().split('"value": ')[1].split(",")[0]))
