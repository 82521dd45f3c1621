"""Folders of small random 8-bit images, the stand-in for generated and prepared real sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def png_folder(path: Path, n: int, seed: int, size: int = 16, mode: str = "L") -> Path:
    """``n`` random ``size`` x ``size`` PNGs (grey ``L`` or ``RGB``) named 000.png, 001.png, ... in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path / f"{i:03d}.png")
    return path
