"""Image datasets held as uint8 arrays, and the folder-of-images dataset.

Every fidmed dataset hands out ``torch.uint8`` tensors shaped ``[C, H, W]`` (C = 1 or 3) and describes itself
with a *manifest*: a small JSON-able dict holding everything that can change its pixels. The evaluation cache keys
real-image statistics on :meth:`ArrayImageDataset.manifest_hash`, the sha256 of the manifest's canonical JSON.

Loading strategy of :class:`ImageFolderDataset` (``cache`` argument):

* ``"memory"``: decode every file once at construction into one uint8 array ``[N, C, H, W]``. Fastest, and the
  default whenever the decoded set fits in ``memory_limit_bytes`` (2 GiB), which covers the phantom, CT and MRI
  sets at their native sizes.
* ``"disk"``: decode once into ``<cache_dir>/<manifest_hash>.npy`` (written atomically, by default in a hidden
  ``.fidmed_cache`` folder next to the data) and read it memory-mapped. Later runs (and DataLoader workers, and
  DDP ranks) skip decoding; the key is the manifest hash, so a changed file means a new cache file.
  Opt-in because it doubles the disk footprint and the data folder may be read-only.
* ``"none"``: decode lazily in ``__getitem__``. The default for sets too large to hold in memory (NIH ChestX-ray14
  at 1024x1024 is about 117 GB decoded); DataLoader workers then parallelise decoding.

Sizes and modes of all files are checked at construction from the file headers (no decoding), so a mixed folder
fails at once, whatever the cache mode.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from fidmed.atomic import atomic_write, remove_stale_temp_files
from fidmed.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Bump when the way files become arrays changes (mode conversions, file selection): it is part of the manifest.
LOADER_VERSION = "folder-1"
PREPARE_MANIFEST = "manifest.json"
# `fidmed prepare` keeps its resume state here; present without PREPARE_MANIFEST = an unfinished preparation.
PREPARE_STATE_DIRNAME = ".fidmed_prepare"
CACHE_DIRNAME = ".fidmed_cache"
CacheMode = Literal["auto", "memory", "disk", "none"]

# Modes whose pixels are 16/32-bit: converting them with PIL would clip or wrap, so they are refused.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``manifest`` (sorted keys, no whitespace, ASCII)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


class ArrayImageDataset(torch.utils.data.Dataset):
    """Base of fidmed's image datasets: uint8 ``[C, H, W]`` tensors plus a manifest.

    Subclasses set ``name``, ``resolution`` (side length of the square images), ``num_channels`` and either fill
    ``_array`` (uint8 ``[N, C, H, W]``, in memory or memory-mapped) or override :meth:`_load`.
    """

    name: str
    resolution: int
    num_channels: int
    _array: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> np.ndarray:
        assert self._array is not None
        return self._array[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        return torch.from_numpy(np.array(self._load(int(index) % len(self)), dtype=np.uint8, copy=True))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return (self.num_channels, self.resolution, self.resolution)

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), C, H, W]`` for the given indices (a copy)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._array is not None:
            return np.array(self._array[indices], dtype=np.uint8, copy=True)
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        for row, index in enumerate(indices):
            out[row] = self._load(int(index))
        return out

    def manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    def manifest_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`manifest`; the evaluation cache keys on it."""
        return manifest_sha256(self.manifest())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, channels={self.num_channels}, "
            f"resolution={self.resolution})"
        )


@dataclass(frozen=True)
class ImageFile:
    """One image file of a folder dataset, as found at construction."""

    relpath: str  # POSIX path relative to the dataset root; the sort key
    size_bytes: int
    mtime_ns: int


def list_image_files(root: Path) -> list[ImageFile]:
    """All image files under ``root`` (recursively, hidden files and folders skipped), sorted by relative path."""
    found: list[ImageFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = Path(dirpath) / filename
            stat = full.stat()
            found.append(ImageFile(full.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    found.sort(key=lambda f: f.relpath)
    return found


def _target_mode(mode: str, channels: int | None, path: Path) -> str:
    """The PIL mode a file of ``mode`` is converted to, given the requested ``channels`` (None = natural)."""
    if mode in _HIGH_DEPTH_MODES:
        raise DataError(
            f"{path} is a {mode} (16/32-bit) image; fidmed reads 8-bit images only. Rescale it to 8 bits with "
            f"`fidmed prepare` (which min-max rescales each image/volume to [0, 255]) or convert it yourself."
        )
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    # Natural channel count: grey stays grey, colour becomes RGB. RGBA and LA become 'L' as the study's
    # prepare_xray.py did (PIL convert('L') of the about 1,000 4-channel ChestX-ray14 files).
    if mode in ("L", "1", "LA", "La", "RGBA", "RGBa"):
        return "L"
    return "RGB"


def _decode(path: Path, mode: str) -> np.ndarray:
    """Decode one file to uint8 ``[C, H, W]`` in PIL ``mode`` ('L' or 'RGB')."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            if image.mode in _HIGH_DEPTH_MODES:
                _target_mode(image.mode, None, path)  # raises
            if image.mode != mode:
                image = image.convert(mode)
            array = np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot decode image {path} ({exc}); remove or replace the file (or re-run `fidmed prepare`)."
        ) from exc
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


class ImageFolderDataset(ArrayImageDataset):
    """All PNG/JPEG/BMP/TIFF images under ``path`` (recursively, sorted by relative path) as uint8 ``[C, H, W]``.

    Args:
        path: dataset root, typically written by ``fidmed prepare``.
        resolution: required side length; every image must be ``resolution x resolution``. None: the common
            size of the files, which must be square.
        channels: 1 (convert to PIL 'L'), 3 (convert to 'RGB') or None (grey files -> 1 channel, colour files ->
            3; RGBA/LA -> 'L' as in the study's X-ray preparation). A folder mixing grey and colour files needs
            an explicit value.
        name: label used in logs; defaults to the folder name. Not part of the manifest.
        cache: "auto" | "memory" | "disk" | "none", see the module docstring.
        cache_dir: folder for the "disk" cache; default ``<path>/.fidmed_cache``.
        num_threads: threads decoding files for the memory/disk caches (PIL releases the GIL while decoding).
        memory_limit_bytes: "auto" decodes into memory up to this decoded size, else loads lazily.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int | None = None,
        channels: int | None = None,
        name: str | None = None,
        cache: CacheMode = "auto",
        cache_dir: str | os.PathLike | None = None,
        num_threads: int | None = None,
        memory_limit_bytes: int = 2 << 30,
    ) -> None:
        self.root = Path(path).expanduser()
        if channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or null, got {channels!r}")
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ConfigError(f"resolution must be a positive integer or null, got {resolution!r}")
        if cache not in ("auto", "memory", "disk", "none"):
            raise ConfigError(f"cache must be one of auto, memory, disk, none; got {cache!r}")
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DataError(
                f"image folder {self.root} {what}; create it with `fidmed prepare <modality> --src ... "
                f"--out {self.root}` or fix the modality's `path`."
            )
        if (self.root / PREPARE_STATE_DIRNAME).is_dir() and not (self.root / PREPARE_MANIFEST).is_file():
            raise DataError(
                f"{self.root} is an unfinished `fidmed prepare` output (interrupted, or still running: "
                f"no {PREPARE_MANIFEST} yet); re-run the same `fidmed prepare` command to finish it."
            )
        self.name = name or self.root.resolve().name
        self.files = list_image_files(self.root)
        if not self.files:
            raise DataError(
                f"image folder {self.root} holds no {'/'.join(IMAGE_EXTENSIONS)} files; fill it with "
                f"`fidmed prepare <modality> --src ... --out {self.root}`."
            )
        self._modes = self._scan_headers(resolution, channels)
        self.num_channels = 1 if self._modes[0] == "L" else 3
        self._prepare_manifest_sha256 = self._hash_prepare_manifest()
        self._num_threads = num_threads or min(8, os.cpu_count() or 1)

        decoded_bytes = len(self.files) * self.num_channels * self.resolution**2
        if cache == "auto":
            cache = "memory" if decoded_bytes <= memory_limit_bytes else "none"
        self.cache_mode: str = cache
        self.cache_path: Path | None = None
        if cache == "memory":
            self._array = self._decode_all()
        elif cache == "disk":
            self.cache_path = Path(cache_dir) if cache_dir is not None else self.root / CACHE_DIRNAME
            self.cache_path = self.cache_path / f"{self.manifest_hash()}.npy"
            self._array = self._open_disk_cache(self.cache_path)

    def __len__(self) -> int:
        return len(self.files)

    # -- construction -------------------------------------------------------------------------------------------
    def _scan_headers(self, resolution: int | None, channels: int | None) -> list[str]:
        """Check sizes and modes of all files from their headers; return each file's target PIL mode."""
        modes: list[str] = []
        first_size: tuple[int, int] | None = None
        for file in self.files:
            path = self.root / file.relpath
            try:
                with PIL.Image.open(path) as image:
                    size, mode = image.size, image.mode
            except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
                raise DataError(
                    f"cannot read image {path} ({exc}); remove or replace the file (or re-run `fidmed prepare`)."
                ) from exc
            if resolution is not None and size != (resolution, resolution):
                raise DataError(
                    f"{path} is {size[0]}x{size[1]} (WxH) but the dataset's resolution is "
                    f"{resolution}x{resolution}; re-run `fidmed prepare` at that resolution or set "
                    f"the modality's resolution to match."
                )
            if first_size is None:
                first_size = size
            elif size != first_size:
                raise DataError(
                    f"images in {self.root} differ in size: {self.files[0].relpath} is "
                    f"{first_size[0]}x{first_size[1]} but {file.relpath} is {size[0]}x{size[1]} (WxH); "
                    f"all images must share one size: re-run `fidmed prepare` or remove the odd files."
                )
            modes.append(_target_mode(mode, channels, path))
        assert first_size is not None
        if first_size[0] != first_size[1]:
            raise DataError(
                f"images in {self.root} are {first_size[0]}x{first_size[1]} (WxH); fidmed needs square "
                f"images: pad or resample them with `fidmed prepare`."
            )
        self.resolution = first_size[0]
        if len(set(modes)) > 1:
            first_rgb = next(f for f, m in zip(self.files, modes) if m == "RGB")
            first_grey = next(f for f, m in zip(self.files, modes) if m == "L")
            raise DataError(
                f"{self.root} mixes grey and colour images (e.g. {first_grey.relpath} and "
                f"{first_rgb.relpath}); set the modality's `channels` to 1 or 3 to convert them all."
            )
        return modes

    def _hash_prepare_manifest(self) -> str | None:
        path = self.root / PREPARE_MANIFEST
        if not path.is_file():
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def _decode_all(self) -> np.ndarray:
        array = np.empty((len(self), *self.image_shape), dtype=np.uint8)

        def decode_into(index: int) -> None:
            array[index] = self._load(index)

        if self._num_threads > 1 and len(self) > 1:
            with ThreadPoolExecutor(self._num_threads) as pool:
                list(pool.map(decode_into, range(len(self))))
        else:
            for index in range(len(self)):
                decode_into(index)
        return array

    def _open_disk_cache(self, cache_file: Path) -> np.ndarray:
        if not cache_file.is_file():
            array = self._decode_all()
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temp_files(cache_file.parent)  # left by a decode that was killed
                # Atomic: concurrent ranks/jobs may race; each writes its own temporary file, the last rename wins
                # and all of them hold identical bytes.
                with atomic_write(cache_file) as handle:
                    np.save(handle, array)
            except OSError as exc:
                raise DataError(
                    f"cannot write the decoded-image cache {cache_file} ({exc}); pass a writable "
                    f"cache_dir or use cache='memory' or 'none'."
                ) from exc
        array = np.load(cache_file, mmap_mode="r")
        if array.shape != (len(self), *self.image_shape) or array.dtype != np.uint8:
            raise DataError(
                f"decoded-image cache {cache_file} has shape {array.shape}, expected "
                f"{(len(self), *self.image_shape)}; delete the file and retry."
            )
        return array

    # -- access -------------------------------------------------------------------------------------------------
    def _load(self, index: int) -> np.ndarray:
        if self._array is not None:
            return self._array[index]
        image = _decode(self.root / self.files[index].relpath, self._modes[index])
        if image.shape != self.image_shape:  # file changed after construction
            raise DataError(
                f"{self.root / self.files[index].relpath} decoded to shape {image.shape}, expected "
                f"{self.image_shape}; the folder changed while in use: restart."
            )
        return image

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), C, H, W]``; without an array cache the files are decoded in threads."""
        if self._array is not None or len(indices) < 2 or self._num_threads < 2:
            return super().get_batch(indices)
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)

        def decode_into(row: int) -> None:
            out[row] = self._load(int(indices[row]))

        with ThreadPoolExecutor(self._num_threads) as pool:
            list(pool.map(decode_into, range(len(indices))))
        return out

    def manifest(self) -> dict[str, Any]:
        """What determines the pixels: file list (names, sizes, mtimes; hashed), resolution, channels, loader.

        Content is not read: a file rewritten with the same size and mtime is not detected (tools that rewrite
        files update their mtime). ``prepare_manifest_sha256`` is the hash of ``manifest.json`` written by
        ``fidmed prepare`` when present, so re-preparing with other settings changes the hash too.
        """
        listing = hashlib.sha256()
        for file in self.files:
            listing.update(f"{file.relpath}\t{file.size_bytes}\t{file.mtime_ns}\n".encode())
        return {
            "kind": "folder",
            "loader_version": LOADER_VERSION,
            "count": len(self.files),
            "files_sha256": listing.hexdigest(),
            "resolution": self.resolution,
            "channels": self.num_channels,
            "prepare_manifest_sha256": self._prepare_manifest_sha256,
        }
