"""Training fingerprints: the sha256 of every setting that changes a trained generator's weights.

A training run is identified by its fingerprint: the modality's data settings (a folder written by
``fidmed prepare`` by the sha256 of its ``manifest.json``, any other folder by its path), the effective
augmentation (registry name and options, after the modality's overrides), the model, the training length, the
seed, and the Lightning arguments that change the weights (accelerator, devices, precision, strategy, nodes).
Loading settings, logging, checkpoint and evaluation intervals, ``trainer.benchmark`` and every evaluation setting
stay out, so jobs that differ only in those share one generator under
``<paths.train_root>/<modality>-<augmentation>-<fingerprint[:12]>/``. ``model.compile=true`` enters it (compiled
kernels round differently, so the weights differ from eager ones in their last bits and a generator must not be
resumed across the two); ``model.compile=false``, the default, adds nothing, so the eager fingerprints of
configurations from before the option existed are unchanged.

The fingerprint names folders of trained generators: a change here retrains every generator. The values of
existing configurations are pinned by tests/test_training.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fidmed.data.folder import PREPARE_MANIFEST
from fidmed.errors import ConfigError

FINGERPRINT_VERSION = 2  # 2: a prepared folder is identified by its manifest.json, not by where it lies
#: Lightning arguments that change the trained weights (the others, and the checkpoint/evaluation intervals, do
#: not). strategy and num_nodes enter only when they differ from Lightning's defaults, as before they were settings.
_WEIGHT_TRAINER_KEYS = ("accelerator", "devices", "precision", "strategy", "num_nodes")
_TRAINER_DEFAULTS = {"strategy": "auto", "num_nodes": 1}
#: Modality settings that do not change the trained weights.
_NON_WEIGHT_MODALITY_KEYS = {"study_kimg", "path_hint", "cache", "cache_dir", "num_workers"}
#: Model settings recorded only when not at their default (value): fingerprints from before they existed stay valid.
_MODEL_KEYS_IF_SET = {"compile": False}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def data_identity(modality: dict[str, Any]) -> dict[str, Any]:
    """What identifies a folder modality's images in the fingerprint.

    A folder written by ``fidmed prepare`` is identified by the sha256 of its ``manifest.json`` (deterministic:
    preparer, parameters, source files by relative path, outputs), so a prepared folder copied or moved
    elsewhere (e.g. to a cluster's scratch disk) keeps its fingerprint and its trained generator. Any other
    folder is identified by its path, as before: fidmed cannot tell a moved folder from a different one without
    reading every file.
    """
    path = modality.get("path")
    if modality.get("kind") != "folder" or not path:
        return {}
    manifest = Path(str(path)).expanduser() / PREPARE_MANIFEST
    if manifest.is_file():
        return {"prepared_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    return {"path": str(path)}


def effective_augmentation(cfg: Any) -> Any:
    """The augmentation config with the modality's overrides applied (the study: ADA ``bgcfn`` and DiffAugment
    ``color,translation`` for mri)."""
    overrides = (cfg.modality.get("augmentation_overrides") or {}).get(cfg.augmentation.name) or {}
    try:
        return OmegaConf.merge(cfg.augmentation, overrides)
    except OmegaConfBaseException as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"modality.augmentation_overrides.{cfg.augmentation.name} does not fit augmentation "
            f"{cfg.augmentation.name!r} ({detail}); fix or remove that override."
        ) from None


def fingerprint_record(cfg: Any) -> dict[str, Any]:
    """The settings that define a trained generator."""
    modality = {k: v for k, v in _plain(cfg.modality).items() if k not in _NON_WEIGHT_MODALITY_KEYS}
    modality.pop("path", None)
    modality.update(data_identity(_plain(cfg.modality)))
    lightning = _plain(cfg.trainer)
    trainer = {
        k: lightning[k]
        for k in _WEIGHT_TRAINER_KEYS
        if k in lightning and lightning[k] != _TRAINER_DEFAULTS.get(k, object())
    }
    trainer["kimg"] = _plain(cfg.schedule)["kimg"]  # the training length (recorded under its historic place)
    return {
        "version": FINGERPRINT_VERSION,
        "modality": modality,
        "augmentation": _plain(effective_augmentation(cfg)),
        "model": {
            k: v for k, v in _plain(cfg.model).items() if k not in _MODEL_KEYS_IF_SET or v != _MODEL_KEYS_IF_SET[k]
        },
        "trainer": trainer,
        "seed": int(cfg.seed),
    }


def training_fingerprint(cfg: Any) -> str:
    text = json.dumps(fingerprint_record(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def train_dir_for(cfg: Any, fingerprint: str | None = None) -> Path:
    """The training folder of ``cfg``: ``<paths.train_root>/<modality>-<augmentation>-<fingerprint[:12]>``."""
    fp = fingerprint or training_fingerprint(cfg)
    return Path(cfg.paths.train_root) / f"{cfg.modality.name}-{cfg.augmentation.name}-{fp[:12]}"
