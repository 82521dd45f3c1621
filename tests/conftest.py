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
        from fidmed.config import check_config, register_configs

        register_configs()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        check_config(cfg)
        if resolve_paths:
            with open_dict(cfg):
                cfg.paths.root = str(tmp_path)
                cfg.paths.run_dir = str(tmp_path / "run")
                cfg.paths.train_root = str(tmp_path / "train")
                cfg.paths.cache_dir = str(tmp_path / "cache")
                cfg.paths.weights_dir = str(tmp_path / "weights")
        return cfg

    return _compose


def extractor_cfg(name: str, path: Path | None = None, **over):
    """The registered extractor ``name`` as an ``ExtractorSetup``, with config overrides (``input_size``,
    ``resizer``, ``weights_source``, ``seed``) and architecture options (e.g. ``depth``) from ``over``; ``path``
    pins the weights to that (test-made) file by its name and sha256."""
    import dataclasses
    import hashlib

    from fidmed.features.registry import CONFIG_KEYS, extractor_setup
    from fidmed.features.weights import WeightsFile

    config = {k: over.pop(k) for k in list(over) if k in CONFIG_KEYS}
    setup = extractor_setup({"name": name, **config})
    if path is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        setup = dataclasses.replace(setup, weights=WeightsFile(path.name, digest))
    return setup.with_options(**over) if over else setup


@pytest.fixture
def one_cpu_thread():
    """Tiny networks: with several intra-op threads on a loaded 2-core machine a step took ~100x longer
    (measured 1.7 s vs 0.016 s per Gmain call), so run single-threaded and restore the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
