"""Extractor weights files: find, verify (sha256, md5) and, when allowed and online, download them; import them.

This module knows files, digests and folders, nothing about networks: whether a file loads into an architecture is
asked of the caller (``import_weights``'s ``load_check``; the extractor registry supplies it).

Search order for a file ``wfile.filename``:
  1. the weights folder: the ``weights_dir`` argument, else ``$FIDMED_WEIGHTS``, else ``~/.cache/fidmed/weights``;
  2. torch hub's checkpoint cache, ``torch.hub.get_dir()/checkpoints`` (where pytorch-fid and torchvision keep
     their downloads, so an existing pytorch-fid install is reused);
  3. the Hugging Face hub cache, for files published on huggingface.co;
  4. a download (only with ``allow_download=True`` and not offline) into the weights folder: to a temporary file,
     verified, then renamed atomically.
Every file found is verified against ``wfile.sha256`` (a full digest, or a prefix when only a prefix is known) and
``wfile.md5`` (where the publisher gives only an md5, as Keras does). Hashing a 100 MB file takes about a second,
so a verified digest is remembered in ``<file>.sha256.json`` next to the file, keyed by the file's name, size and
modification time; any change to the file means hashing it again.

Offline: ``HF_HUB_OFFLINE=1`` or ``FIDMED_OFFLINE=1`` forbids downloads. A download first probes the URL with a
short timeout in a helper thread (DNS included), so a machine without network fails in seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fidmed.errors import FidmedError, WeightsMissingError

_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 5.0
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

#: How to run without real weights; part of every missing-weights message.
WITHOUT_WEIGHTS = (
    "To run without real weights (numbers labelled RANDOM-INIT: they test the plumbing and are "
    "not comparable to any published FD): `python run.py eval.weights=random` (or "
    "`experiment=smoke`), `fidmed evaluate ... --weights random`."
)


@dataclass(frozen=True)
class WeightsFile:
    """One weights file: its name, digests (sha256 full or a prefix; md5 where that is all the publisher gives),
    where to get it and how.

    ``sha256=None`` marks a file whose sha256 no trustworthy public source publishes ("unpinned"): it is used
    as found, never substituted, and every number made with it records the local file's own sha256, so two
    results can still be told apart; ``fidmed weights list`` shows such files as UNPINNED. A published ``md5``
    (Keras' ImageNet files) is checked wherever the file is found.
    """

    filename: str
    sha256: str | None
    urls: tuple[str, ...] = ()
    description: str = ""
    how_to: str = ""  # where a user gets the file when offline (shown in the error message)
    md5: str | None = None

    def __post_init__(self) -> None:
        if not self.filename or "/" in self.filename or "\\" in self.filename:
            raise FidmedError(f"weights filename must be a plain file name, got {self.filename!r}")
        if self.sha256 is not None and not _HEX.match(self.sha256):
            raise FidmedError(f"sha256 for {self.filename} must be 8 to 64 lowercase hex digits, got {self.sha256!r}")
        if self.md5 is not None and not _MD5.match(self.md5):
            raise FidmedError(f"md5 for {self.filename} must be 32 lowercase hex digits, got {self.md5!r}")
        object.__setattr__(self, "urls", tuple(self.urls))

    @property
    def full_hash(self) -> bool:
        return self.sha256 is not None and len(self.sha256) == 64

    @property
    def pinned(self) -> bool:
        """A published sha256 (full or prefix) identifies the file."""
        return self.sha256 is not None

    @property
    def identified_by_digest(self) -> bool:
        """A published digest (sha256 or md5) identifies the file's content."""
        return self.sha256 is not None or self.md5 is not None

    @property
    def is_hdf5(self) -> bool:
        return self.filename.endswith(".h5")


# ------------------------------------------------------------------------------------------------ locations
def default_weights_dir() -> Path:
    """``$FIDMED_WEIGHTS`` if set, else ``~/.cache/fidmed/weights``."""
    env = os.environ.get("FIDMED_WEIGHTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fidmed" / "weights"


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "FIDMED_OFFLINE"))


def _weights_dir(weights_dir: Path | str | None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


_HF_URL = re.compile(r"^https://huggingface\.co/([^/]+)/([^/]+)/resolve/[^/]+/(.+)$")


def hf_cache_dirs(wfile: WeightsFile) -> list[Path]:
    """``models--ORG--NAME/snapshots`` in the Hugging Face hub cache for each huggingface.co URL of ``wfile``."""
    out = []
    for url in wfile.urls:
        m = _HF_URL.match(url)
        if m is not None and m.group(3) == wfile.filename:
            out.append(hf_hub_cache_dir() / f"models--{m.group(1)}--{m.group(2)}" / "snapshots")
    return out


def hf_cache_paths(wfile: WeightsFile) -> list[Path]:
    """Copies of ``wfile`` in the Hugging Face hub cache (where open_clip and timm keep their downloads):
    ``models--ORG--NAME/snapshots/*/FILE`` for each huggingface.co URL of the file, newest first."""
    out: list[Path] = []
    for snapshots in hf_cache_dirs(wfile):
        found = [p for p in snapshots.glob(f"*/{wfile.filename}") if p.is_file()]
        out += sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    return out


def search_paths(wfile: WeightsFile, weights_dir: Path | str | None = None) -> list[Path]:
    """Where ``resolve_weights`` looks, in order: the weights folder, torch hub's checkpoints, the HF hub cache."""
    return [_weights_dir(weights_dir) / wfile.filename, hub_checkpoint_dir() / wfile.filename, *hf_cache_paths(wfile)]


# ------------------------------------------------------------------------------------------------ hashing
def _cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(path: Path | str, algo: str, use_cache: bool) -> str:
    """Hex digest (``sha256`` or ``md5``) of a file, remembered next to it keyed by name, size and mtime."""
    path = Path(path)
    key = _stat_key(path)
    cache = _cache_path(path)
    pattern = _HEX if algo == "sha256" else _MD5
    rec: dict[str, Any] = {}
    if use_cache and cache.is_file():
        try:
            rec = json.loads(cache.read_text())
            if all(rec.get(k) == v for k, v in key.items()):
                if pattern.match(str(rec.get(algo, ""))):
                    return str(rec[algo])
            else:
                rec = {}
        except (OSError, ValueError):
            rec = {}
    digest = _hash_file(path, algo)
    if use_cache:
        try:  # best effort: the folder may be read-only (a shared hub cache)
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**rec, **key, algo: digest}))
            os.replace(tmp, cache)
        except OSError:
            pass
    return digest


def sha256_of(path: Path | str, use_cache: bool = True) -> str:
    """Hex sha256 of a file (streamed), remembered next to it keyed by name, size and mtime."""
    return _digest(path, "sha256", use_cache)


def md5_of(path: Path | str, use_cache: bool = True) -> str:
    """Hex md5 of a file (Keras publishes md5 digests only; a comparison, not security)."""
    return _digest(path, "md5", use_cache)


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_HDF5_MAGIC)) == _HDF5_MAGIC


def verify_weights(path: Path | str, wfile: WeightsFile, use_cache: bool = True) -> None:
    """Raise FidmedError when the file's sha256 (full digest or prefix) or md5 differs from the published one."""
    path = Path(path)
    if wfile.sha256 is not None:
        actual = sha256_of(path, use_cache)
        if not actual.startswith(wfile.sha256):
            raise FidmedError(
                f"weights file {path} has the wrong sha256:\n  expected {wfile.sha256}\n  actual   {actual}\n"
                f"The file is corrupt, truncated or a different version. Delete it and get {wfile.filename} again"
                + (f" from {wfile.urls[0]}" if wfile.urls else "")
                + "."
            )
    if wfile.md5 is not None:
        actual = md5_of(path, use_cache)
        if actual != wfile.md5:
            raise FidmedError(
                f"weights file {path} has the wrong md5:\n  expected {wfile.md5} (the publisher's)\n"
                f"  actual   {actual}\nThe file is corrupt, truncated or another file. Delete it and get "
                f"{wfile.filename} again" + (f" from {wfile.urls[0]}" if wfile.urls else "") + "."
            )


# ------------------------------------------------------------------------------------------------ download
def _probe(url: str, timeout: float) -> str | None:
    """None when the URL answers within ``timeout`` seconds, else the reason (DNS and connect included)."""
    result: list[str | None] = [f"timed out after {timeout:.0f} s"]

    def attempt() -> None:
        try:
            # GET of one byte, not HEAD: signed release-asset URLs may refuse HEAD
            req = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
            with urllib.request.urlopen(req, timeout=timeout):
                result[0] = None
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
            result[0] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return result[0]


def _download(wfile: WeightsFile, target_dir: Path, timeout: float) -> tuple[Path | None, list[str]]:
    """Try each URL; returns (path or None, reasons for failures)."""
    reasons: list[str] = []
    for url in wfile.urls:
        why = _probe(url, timeout)
        if why is not None:
            reasons.append(f"{url}: {why}")
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        tmp = target_dir / f".{wfile.filename}.{os.getpid()}.partial"
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=None, progress=True)
            verify_weights(tmp, wfile)
            final = target_dir / wfile.filename
            os.replace(tmp, final)
            _cache_path(tmp).unlink(missing_ok=True)
            return final, reasons
        except Exception as e:  # noqa: BLE001 - report and try the next URL
            reasons.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
            _cache_path(tmp).unlink(missing_ok=True)
    return None, reasons


# ------------------------------------------------------------------------------------------------ resolving
def missing_message(
    wfile: WeightsFile, weights_dir: Path | str | None, why_no_download: str, extractor: str | None = None
) -> str:
    """What is missing, where fidmed looked, and every way forward (``extractor`` names it in the commands)."""
    folder = _weights_dir(weights_dir)
    hash_note = (
        ""
        if wfile.full_hash
        else " (unpinned: no published digest; the file is used as found and its "
        "own sha256 is recorded with every number)"
        if wfile.sha256 is None
        else " (prefix; only a prefix of the digest is known)"
    )
    name = extractor or "NAME"
    lines = [
        f"weights file {wfile.filename} not found" + (f" ({wfile.description})" if wfile.description else ""),
        f"  sha256: {wfile.sha256}{hash_note}" + (f"; md5 {wfile.md5} (published)" if wfile.md5 else ""),
        f"  looked in: {', '.join(dict.fromkeys(str(p.parent) for p in search_paths(wfile, weights_dir)))}"
        + "".join(f", {d}" for d in hf_cache_dirs(wfile)),
        f"  not downloaded: {why_no_download}",
    ]
    if wfile.urls:
        lines.append(
            f"Fix: online, run `fidmed weights download {name}`, or allow downloads (`eval.allow_download=true` "
            f"in run.py, `fidmed evaluate --allow-download`); offline, get the file on a machine with internet "
            f"from {' or '.join(wfile.urls)}, then run `fidmed weights import PATH` (or copy it into {folder}, "
            f"or the folder $FIDMED_WEIGHTS names)."
        )
    else:
        lines.append(
            f"Fix: this file cannot be downloaded by URL; get it as described below, then run "
            f"`fidmed weights import PATH` (or copy it into {folder}, or the folder $FIDMED_WEIGHTS names)."
        )
    if wfile.how_to:
        lines.append(f"  {wfile.how_to}")
    lines.append(WITHOUT_WEIGHTS)
    return "\n".join(lines)


def find_weights(wfile: WeightsFile, weights_dir: Path | str | None = None) -> Path | None:
    """The first existing candidate (verified; a wrong digest raises), or None."""
    for path in search_paths(wfile, weights_dir):
        if path.is_file():
            verify_weights(path, wfile)
            return path
    return None


def resolve_weights(
    wfile: WeightsFile,
    weights_dir: Path | str | None = None,
    allow_download: bool = False,
    timeout: float = PROBE_TIMEOUT_S,
    extractor: str | None = None,
) -> Path:
    """Path of a verified local copy of ``wfile``; downloads only when allowed and online.

    Raises ``WeightsMissingError`` (naming the file, its sha256, the URL, the folder, the commands that get it
    and how to run without it) when the file is nowhere and cannot be downloaded, and ``FidmedError`` when a file
    is found with the wrong digest. ``extractor`` names the extractor in the message's commands.
    """
    found = find_weights(wfile, weights_dir)
    if found is not None:
        return found
    if not allow_download:
        why = "downloads are not allowed for this run"
    elif is_offline():
        why = "offline (HF_HUB_OFFLINE=1 or FIDMED_OFFLINE=1 is set)"
    elif not wfile.urls:
        why = "no download URL is known for this file"
    else:
        path, reasons = _download(wfile, _weights_dir(weights_dir), timeout)
        if path is not None:
            return path
        why = "download failed: " + "; ".join(reasons)
    raise WeightsMissingError(missing_message(wfile, weights_dir, why, extractor))


# ------------------------------------------------------------------------------------------------ importing
#: ``load_check(wfile, path)`` loads ``path`` into the architecture ``wfile`` belongs to and says what it verified
#: ("loaded into SwAV ResNet-50: 2048-d features"), or raises FidmedError.
LoadCheck = Callable[[WeightsFile, Path], str]


@dataclass(frozen=True)
class ImportedWeights:
    """The result of ``import_weights``: which known file it is, where it now is, and what was verified."""

    file: WeightsFile
    path: Path
    verified: str


def _name_mismatch(src_name: str, wfile: WeightsFile, sha: str, md5: str | None) -> str:
    what = (
        f"sha256 {sha} is not the published {wfile.sha256}"
        if wfile.sha256 is not None
        else f"md5 {md5} is not the published {wfile.md5} (wrong md5)"
    )
    return (
        f"{src_name} is named like {wfile.filename} but its {what}: the file is corrupt, truncated or another "
        f"version. Get it again" + (f" from {wfile.urls[0]}" if wfile.urls else "") + "."
    )


def identify_weights(
    src: Path | str, files: Iterable[WeightsFile], load_check: LoadCheck, name: str | None = None
) -> tuple[WeightsFile, str]:
    """Which of ``files`` the file ``src`` is, by its content, and what was verified.

    In order: a published sha256 (prefix) or md5 equal to the file's (the file then also has to load, where an
    md5 is all there is); a file named exactly like an unpinned one has to load into that one's architecture; any
    other file is tried in the architecture of every unpinned file of its kind (HDF5 or not) and is recognised when
    exactly one accepts it. ``name`` is the file's name as the user gave it (default: ``src``'s).
    """
    src = Path(src)
    name = name or src.name
    files = list(dict.fromkeys(files))
    sha = sha256_of(src, use_cache=False)
    for wfile in files:
        if wfile.sha256 is not None and sha.startswith(wfile.sha256):
            return wfile, f"sha256 {sha} matches the published digest"
    md5 = md5_of(src, use_cache=False) if any(f.md5 for f in files) else None
    for wfile in files:
        if wfile.sha256 is None and wfile.md5 is not None and wfile.md5 == md5:
            loaded = load_check(wfile, src)
            return wfile, f"md5 {md5} matches the published md5; {loaded}; sha256 {sha} recorded (unpinned)"
    named = [f for f in files if f.filename == name]
    if named:
        wfile = named[0]
        if wfile.identified_by_digest:
            raise FidmedError(_name_mismatch(name, wfile, sha, md5))
        return wfile, f"{load_check(wfile, src)}; sha256 {sha} recorded (unpinned)"
    hdf5 = _is_hdf5(src)
    candidates = [f for f in files if not f.identified_by_digest and f.is_hdf5 == hdf5]
    accepted: list[tuple[WeightsFile, str]] = []
    refused: list[str] = []
    for wfile in candidates:
        try:
            accepted.append((wfile, load_check(wfile, src)))
        except FidmedError as e:
            refused.append(f"  {wfile.filename}: {str(e).splitlines()[0]}")
    if len(accepted) == 1:
        wfile, loaded = accepted[0]
        return wfile, f"{loaded}; sha256 {sha} recorded (unpinned)"
    if len(accepted) > 1:
        raise FidmedError(
            f"{name} loads into the architectures of several known files "
            f"({', '.join(f.filename for f, _ in accepted)}); rename it to the one it is and import "
            f"it again."
        )
    known = "\n".join(
        f"  {f.filename}  " + (f"sha256 {f.sha256}" if f.sha256 else f"md5 {f.md5}" if f.md5 else "unpinned")
        for f in files
    )
    tried = ("\nIt loads into none of the unpinned files' architectures:\n" + "\n".join(refused)) if refused else ""
    raise FidmedError(
        f"{name} (sha256 {sha}) matches no known weights file: its digest is none of the published "
        f"ones.{tried}\nKnown files (`fidmed weights list` says where to get them):\n{known}"
    )


def import_weights(
    src: Path | str, files: Iterable[WeightsFile], load_check: LoadCheck, weights_dir: Path | str | None = None
) -> ImportedWeights:
    """Put a user-supplied file into the weights folder under its canonical name (``fidmed weights import PATH``).

    The file is first copied into a staging folder next to its destination, recognised there by its content
    (``identify_weights``: published digests, else the architecture it loads into, so a renamed download is
    recognised and a random file is not), then renamed atomically. Raises FidmedError when it is none of ``files``;
    nothing is left behind then.
    """
    src = Path(src).expanduser()
    if not src.is_file():
        raise FidmedError(f"{src} is not a file; give the path of a downloaded weights file")
    folder = _weights_dir(weights_dir)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the import fails
    staging = folder / f".import-{os.getpid()}-{threading.get_ident()}"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / src.name  # the user's file name, so that messages about the copy read like messages about it
    try:
        shutil.copyfile(src, tmp)
        wfile, verified = identify_weights(tmp, files, load_check)
        final = folder / wfile.filename
        os.replace(tmp, final)
    except FidmedError as e:
        shutil.rmtree(staging, ignore_errors=True)
        for p in created:  # innermost first: folders this import created, now empty
            try:
                p.rmdir()
            except OSError:
                break
        raise FidmedError(str(e).replace(str(tmp), str(src))) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    verify_weights(final, wfile)
    return ImportedWeights(wfile, final, verified)
