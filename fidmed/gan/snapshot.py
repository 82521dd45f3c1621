"""The fidmed generator snapshot on disk: its format tag, its file name, atomic writes, and what a file is.

A snapshot (``network-snapshot-XXXXXX.pt``, ``final.pt``) is a dict of tensors and plain values only: ``format``
(:data:`SNAPSHOT_FORMAT`), ``G_ema`` (its state dict), the arguments that build it and where it came from. So it is
read with ``torch.load(weights_only=True)``: nothing in the file is executed. Loading any supported generator file
(snapshots, ``last.ckpt``, stylegan2-ada-pytorch pickles) is :mod:`fidmed.gan.checkpoint`.

:func:`file_kind` recognises a file by its first bytes, so that a wrong file given as a generator is named for
what it is (a PNG image, a folder, a zip archive ...) instead of failing deep inside an unpickler.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fidmed.atomic import atomic_write

SNAPSHOT_FORMAT = "fidmed-generator-v1"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see half a file."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def snapshot_name(kimg: float) -> str:
    """stylegan2-ada-pytorch's naming: whole kimg, six digits."""
    return (
        f"network-snapshot-{int(round(kimg * 1000)) // 1000:06d}.pt"
        if kimg >= 1
        else f"network-snapshot-{int(round(kimg * 1000)):06d}img.pt"
    )


# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileKind:
    """What a path is: ``code`` for decisions, ``text`` for messages ("a PNG image")."""

    code: str
    text: str


#: torch.save's legacy (non-zip) format starts with a protocol-2 pickle of this number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_SIGNATURES: tuple[tuple[bytes, FileKind], ...] = (
    (b"\x89PNG\r\n\x1a\n", FileKind("png", "a PNG image")),
    (b"\xff\xd8\xff", FileKind("jpeg", "a JPEG image")),
    (b"GIF8", FileKind("gif", "a GIF image")),
    (b"II*\x00", FileKind("tiff", "a TIFF image")),
    (b"MM\x00*", FileKind("tiff", "a TIFF image")),
    (b"\x89HDF\r\n\x1a\n", FileKind("hdf5", "an HDF5 file (e.g. Keras weights)")),
    (b"\x1f\x8b", FileKind("gzip", "a gzip-compressed file")),
    (b"\x93NUMPY", FileKind("npy", "a NumPy .npy array")),
    (b"BZh", FileKind("bzip2", "a bzip2-compressed file")),
    (b"\xfd7zXZ\x00", FileKind("xz", "an xz-compressed file")),
    (_TORCH_LEGACY_MAGIC, FileKind("torch-legacy", "a PyTorch file (torch.save, legacy format)")),
)


def file_kind(path: str | os.PathLike) -> FileKind:
    """Recognise ``path`` by its first bytes (never by its name)."""
    path = Path(path)
    if path.is_dir():
        return FileKind("directory", "a folder")
    if not path.exists():
        return FileKind("missing", "missing")
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        return FileKind("unreadable", f"unreadable ({exc.strerror or exc})")
    if not head:
        return FileKind("empty", "an empty file")
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return FileKind("damaged-zip", "a damaged or truncated zip archive (a PyTorch file cut short is one)")
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return FileKind("torch-zip", "a PyTorch file (torch.save)")
        return FileKind("zip", "a zip archive")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return FileKind("dicom", "a DICOM file")
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return FileKind("pickle", f"a Python pickle (protocol {head[1]})")
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):  # (a protocol-0 pickle is text too)
        return FileKind("text", "a text file")
    return FileKind("unknown", "a file of unrecognised content")
