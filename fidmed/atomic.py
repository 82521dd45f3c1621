"""Atomic file writes: readers see the old file or the whole new one, never half of one.

A killed job leaves at most a hidden ``.<name>.<random>.fidmed.tmp`` file next to the target, never a truncated
target; :func:`remove_stale_temp_files` deletes such leftovers once nobody can still be writing them. The final
file gets the permissions a plain ``open(path, "w")`` would give it (0666 minus the umask), so colleagues who
share an outputs folder can read checkpoints, results and caches as they could read any other file there.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fidmed.errors import FidmedError

TEMP_SUFFIX = ".fidmed.tmp"
#: a temporary file untouched for this long has lost its writer (a writer appends to it until it renames it)
STALE_AFTER_S = 15 * 60
# names of fidmed's own temporary files: atomic_write's, and those of earlier versions (".<name>.<random>.tmp")
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}(\.fidmed)?\.tmp$")


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: ...`` writes a temporary file in the same folder, then fsyncs and renames
    it onto ``path``; on any exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600; a plain write respects umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete fidmed's own temporary files in ``folder`` (not recursive) that nobody has written for
    ``older_than_s`` seconds: what a killed writer left behind. Returns what was deleted."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        if not _TEMP_NAME.match(entry.name) or not entry.is_file():
            continue
        try:
            if now - entry.stat().st_mtime >= older_than_s:
                entry.unlink()
                removed.append(entry)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried for real: permission bits do not stop root, but
    read-only mounts, ACLs and quotas do)."""
    probe = folder / f".fidmed-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def check_writable(
    path: str | os.PathLike | None, what: str, is_dir: bool, fix: str = "choose another location or fix its permissions"
) -> None:
    """Refuse an output location that cannot be written, before any work (not after an hour of evaluation):
    ``path`` a folder (``is_dir``) or a file to be written; missing folders count as writable when they can be
    created in their nearest existing parent."""
    if not path:
        return
    target = Path(path)
    if is_dir:
        if target.exists() and not target.is_dir():
            raise FidmedError(f"{what} {path} is a file; give a folder")
        existing = target if target.exists() else next((q for q in target.parents if q.exists()), Path("."))
    else:
        if target.is_dir():
            raise FidmedError(f"{what} {path} is a folder; give a file name (e.g. {target / 'results.json'})")
        existing = next((q for q in target.parents if q.exists()), Path("."))
    if not existing.is_dir():
        raise FidmedError(f"{what} {path} lies under {existing}, which is a file; choose another location")
    if not _can_create_in(existing):
        raise FidmedError(f"{what} {path} cannot be written ({existing} is not writable); {fix}")
