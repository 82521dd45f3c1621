"""Cache of real-image feature statistics.

A cache entry is keyed by the sha256 of a canonical JSON record of everything that can change the statistics
(dataset manifest hash, extractor, weights label, preprocessing, number of images, split seed, dtype, and the
statistics format version). The record itself is stored inside the file and compared on load, so a stale or
foreign file is never used even if two keys collided in their file-name prefix. Writes go to a temporary file
that is renamed into place: a killed job leaves no cache file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fidmed.atomic import atomic_write

STATS_FORMAT = "fidmed-real-stats-v1"


def canonical_json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"format": STATS_FORMAT, **record}).encode()).hexdigest()


class StatsCache:
    """``load(record)`` / ``save(record, arrays)`` of numpy arrays under ``cache_dir``."""

    def __init__(self, cache_dir: str | os.PathLike | None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def path_for(self, record: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        name = str(record.get("extractor", "stats")).replace("/", "_")
        return self.cache_dir / f"real-{name}-{cache_key(record)[:20]}.npz"

    def load(self, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
        path = self.path_for(record)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored = str(data["__key__"])
                if stored != canonical_json({"format": STATS_FORMAT, **record}):
                    return None
                return {k: data[k] for k in data.files if k != "__key__"}
        except (OSError, ValueError, KeyError):
            return None  # unreadable: recompute and overwrite

    def save(self, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path | None:
        path = self.path_for(record)
        if path is None:
            return None
        with atomic_write(path) as f:
            np.savez(f, __key__=np.array(canonical_json({"format": STATS_FORMAT, **record})), **arrays)
        return path
