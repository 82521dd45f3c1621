"""Datasets (procedural phantoms, image folders), the training DataModule and evaluation batch iteration.

Every dataset yields ``torch.uint8 [C, H, W]`` images and has ``name``, ``resolution``, ``num_channels``,
``manifest()`` and ``manifest_hash()`` (what the real-statistics cache keys on).

The DataModule names are imported on first use, so that ``import fidmed.data`` does not import Lightning
(several seconds) for evaluation-only code.
"""

from __future__ import annotations

import importlib
from typing import Any

from fidmed.data.folder import ArrayImageDataset, ImageFolderDataset, manifest_sha256
from fidmed.data.phantom import PhantomDataset, render_phantom, render_phantoms

_DATAMODULE_NAMES = ("ImageDataModule", "InfiniteSampler", "XFlipDataset", "build_dataset", "iter_batches")

__all__ = [
    "ArrayImageDataset",
    "ImageFolderDataset",
    "PhantomDataset",
    "manifest_sha256",
    "render_phantom",
    "render_phantoms",
    *_DATAMODULE_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULE_NAMES:
        return getattr(importlib.import_module("fidmed.data.datamodule"), name)
    raise AttributeError(f"module 'fidmed.data' has no attribute {name!r}")
