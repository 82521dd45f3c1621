"""Cache of real-image feature statistics.

A cache entry is keyed by the sha256 of a canonical JSON record of everything that can change the statistics
(dataset manifest hash, extractor, weights label, preprocessing, number of images, split seed, dtype, and the
statistics format version). The record itself is stored inside the file and compared on load, so a stale or
foreign file is never used even if two keys collided in their file-name prefix. Writes go to a temporary file
that is renamed into place: a killed job leaves no cache file behind (and its temporary file is deleted by the
next job that opens the cache once it is stale). A cache file that cannot be read (truncated or emptied by a full
disk, or not a cache file) is reported, recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fidmed.atomic import atomic_write, remove_stale_temp_files

log = logging.getLogger(__name__)

STATS_FORMAT = "fidmed-real-stats-v1"


def canonical_json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"format": STATS_FORMAT, **record}).encode()).hexdigest()


class StatsCache:
    """``load(record)`` / ``save(record, arrays)`` of numpy arrays under ``cache_dir``."""

    def __init__(self, cache_dir: str | os.PathLike | None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            for path in remove_stale_temp_files(self.cache_dir):
                log.info("removed %s, left behind by a cache write that was killed", path)

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
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning(
                "the cached real statistics %s cannot be read (%s: %s; truncated or not a cache file): "
                "recomputing them and replacing the file",
                path,
                type(exc).__name__,
                exc,
            )
            return None

    def save(self, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path | None:
        path = self.path_for(record)
        if path is None:
            return None
        with atomic_write(path) as f:
            np.savez(f, __key__=np.array(canonical_json({"format": STATS_FORMAT, **record})), **arrays)
        return path
