"""run.py as a user runs it: a separate process, offline, with every output folder inside the test's tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["experiment=smoke", "logger=none"]  # tiny everything, random-init extractor: seconds on a CPU


def run_py(
    tmp_path: Path, *args: str, timeout: int = 900, env_extra: dict | None = None, run_dir: bool = True
) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in ``tmp_path`` (weights, torch hub, W&B offline; ``paths.root=tmp_path``; with
    ``run_dir`` the run folder is ``tmp_path/run``). Flags (``-m``, ``--cfg``) go first, as Hydra wants them."""
    env = {
        **os.environ,
        "FIDMED_WEIGHTS": str(tmp_path / "weights"),
        "HF_HUB_OFFLINE": "1",
        "FIDMED_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TORCH_HOME": str(tmp_path / "torch_home"),
    }
    env.pop("LOCAL_RANK", None)
    env.pop("FIDMED_DDP_JOB", None)
    env.update(env_extra or {})
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if a not in flags]
    if run_dir and "-m" not in flags and not any(a.startswith("hydra.run.dir=") for a in overrides):
        overrides.insert(0, f"hydra.run.dir={tmp_path / 'run'}")
    cmd = [sys.executable, str(REPO / "run.py"), *flags, f"paths.root={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)
