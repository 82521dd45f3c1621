"""Sources, the units of work of ``fidmed prepare``, and the helpers preparers find them with.

A :class:`Source` is a raw file, or a group of files converted together (a DICOM series); a preparer's
``discover`` returns them in a :class:`Discovery`, with the files it could not use at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fidmed.errors import DataError


@dataclass(frozen=True)
class Source:
    """One unit of work: a raw file, or a group of files (a DICOM series) converted together."""

    key: str  # unique name shown in logs and the manifest (the file's path relative to --src, or a series id)
    files: tuple[str, ...]  # POSIX paths relative to the source root


@dataclass
class Discovery:
    """What a preparer found under the source root: the sources, and files it could not use at all."""

    sources: list[Source]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)


def list_files(root: Path, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
    """POSIX paths (relative to ``root``) of the regular files under ``root``, sorted; hidden files and folders
    (such as the macOS ``._*`` files shipped in the MSD archives) are skipped. ``suffixes`` are matched
    case-insensitively against the end of the name."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not recursive:
            dirnames[:] = []
        for name in filenames:
            if name.startswith("."):
                continue
            if suffixes is not None and not name.lower().endswith(suffixes):
                continue
            found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def strip_suffix(name: str, suffixes: Iterable[str]) -> str:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive)."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: len(name) - len(suffix)]
    return name


def require_unique_stems(src: Path, files: list[str], suffixes: tuple[str, ...]) -> None:
    """The output folder is flat and output names start with the source's file name without ``suffixes``: two
    sources with the same stem in different sub-folders would overwrite each other's images. Refuse them."""
    seen: dict[str, str] = {}
    for rel in files:
        stem = strip_suffix(Path(rel).name, suffixes)
        if stem in seen:
            raise DataError(
                f"{src / seen[stem]} and {src / rel} have the same name; the output folder is flat, "
                f"so prepare them separately (or point --src at one of their folders)."
            )
        seen[stem] = rel
