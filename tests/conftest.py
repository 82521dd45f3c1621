"""Shared fixtures. Tests never touch the network: hub look-ups are forced offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FIDMED_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(overrides) -> the config run.py would see, with all output paths inside tmp_path."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    def _compose(overrides=(), resolve_paths: bool = True):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        if resolve_paths:
            with open_dict(cfg):
                cfg.paths.root = str(tmp_path)
                cfg.paths.run_dir = str(tmp_path / "run")
                cfg.paths.train_root = str(tmp_path / "train")
                cfg.paths.cache_dir = str(tmp_path / "cache")
                cfg.paths.weights_dir = str(tmp_path / "weights")
        return cfg

    return _compose


def extractor_cfg(name: str, path: Path | None = None, **over) -> dict:
    """conf/extractor/NAME.yaml as a dict; ``path`` pins the weights to that (test-made) file by its sha256."""
    import hashlib

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "extractor" / f"{name}.yaml"), resolve=True)
    if path is not None:
        cfg["weights"] = {"filename": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    cfg.update(over)
    return cfg


@pytest.fixture
def one_cpu_thread():
    """Tiny networks: with several intra-op threads on a loaded 2-core machine a step took ~100x longer
    (measured 1.7 s vs 0.016 s per Gmain call), so run single-threaded and restore the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
