"""Extractor weights: find, verify (sha256) and, when allowed and online, download them; offline-friendly.

Search order for a file ``spec.filename``:
  1. the weights folder: the ``weights_dir`` argument, else ``$FIDMED_WEIGHTS``, else ``~/.cache/fidmed/weights``;
  2. torch hub's checkpoint cache, ``torch.hub.get_dir()/checkpoints`` (where pytorch-fid and torchvision keep
     their downloads, so an existing pytorch-fid install is reused);
  3. a download (only with ``allow_download=True`` and not offline) into the weights folder: to a temporary file,
     verified, then renamed atomically.
Every file found is verified against ``spec.sha256`` (a full digest, or a prefix when only a prefix is known).
Hashing a 100 MB file takes about a second, so a verified digest is remembered in ``<file>.sha256.json`` next to
the file, keyed by the file's name, size and modification time; any change to the file means hashing it again.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fidmed.errors import FidmedError, WeightsMissingError

_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WeightsSpec:
    """One weights file: its name, sha256 (full, or a prefix when only that is known), where to get it.

    ``sha256=None`` marks a file whose digest no trustworthy public source publishes ("unpinned"): it is used
    as found, never substituted, and every number made with it records the local file's own sha256, so two
    results can still be told apart; ``fidmed weights list`` shows such files as UNPINNED.
    """

    filename: str
    sha256: str | None
    urls: tuple[str, ...] = ()
    description: str = ""
    how_to: str = ""  # where a user gets the file when offline (shown in the error message)

    def __post_init__(self) -> None:
        if not self.filename or "/" in self.filename or "\\" in self.filename:
            raise FidmedError(f"weights filename must be a plain file name, got {self.filename!r}")
        if self.sha256 is not None and not _HEX.match(self.sha256):
            raise FidmedError(
                f"sha256 for {self.filename} must be 8 to 64 lowercase hex digits, got {self.sha256!r}"
            )
        object.__setattr__(self, "urls", tuple(self.urls))

    @property
    def full_hash(self) -> bool:
        return self.sha256 is not None and len(self.sha256) == 64

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "WeightsSpec":
        """From an extractor config's ``weights`` mapping (filename, sha256, urls, description, how_to)."""
        try:
            return cls(
                filename=str(cfg["filename"]),
                sha256=None if cfg["sha256"] is None else str(cfg["sha256"]).lower(),
                urls=tuple(str(u) for u in (cfg.get("urls") or ())),
                description=str(cfg.get("description") or ""),
                how_to=str(cfg.get("how_to") or ""),
            )
        except KeyError as e:
            raise FidmedError(f"extractor weights config lacks {e.args[0]!r} (needs filename and sha256)") from None


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


def hf_cache_dirs(spec: WeightsSpec) -> list[Path]:
    """``models--ORG--NAME/snapshots`` in the Hugging Face hub cache for each huggingface.co URL of ``spec``."""
    out = []
    for url in spec.urls:
        m = _HF_URL.match(url)
        if m is not None and m.group(3) == spec.filename:
            out.append(hf_hub_cache_dir() / f"models--{m.group(1)}--{m.group(2)}" / "snapshots")
    return out


def hf_cache_paths(spec: WeightsSpec) -> list[Path]:
    """Copies of ``spec``'s file in the Hugging Face hub cache (where open_clip and timm keep their downloads):
    ``models--ORG--NAME/snapshots/*/FILE`` for each huggingface.co URL of the spec, newest first."""
    out: list[Path] = []
    for snapshots in hf_cache_dirs(spec):
        found = [p for p in snapshots.glob(f"*/{spec.filename}") if p.is_file()]
        out += sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    return out


def search_paths(spec: WeightsSpec, weights_dir: Path | str | None = None) -> list[Path]:
    """Where ``resolve_weights`` looks, in order: the weights folder, torch hub's checkpoints, the HF hub cache."""
    return [_weights_dir(weights_dir) / spec.filename, hub_checkpoint_dir() / spec.filename, *hf_cache_paths(spec)]


# ------------------------------------------------------------------------------------------------ hashing
def _cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_of(path: Path | str, use_cache: bool = True) -> str:
    """Hex sha256 of a file (streamed), remembered next to it keyed by name, size and mtime."""
    path = Path(path)
    key = _stat_key(path)
    cache = _cache_path(path)
    if use_cache and cache.is_file():
        try:
            rec = json.loads(cache.read_text())
            if all(rec.get(k) == v for k, v in key.items()) and _HEX.match(str(rec.get("sha256", ""))):
                return str(rec["sha256"])
        except (OSError, ValueError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if use_cache:
        try:  # best effort: the folder may be read-only (a shared hub cache)
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**key, "sha256": digest}))
            os.replace(tmp, cache)
        except OSError:
            pass
    return digest


def verify_weights(path: Path | str, spec: WeightsSpec) -> None:
    """Raise FidmedError when the file's sha256 does not match the spec (full digest or prefix)."""
    path = Path(path)
    if spec.sha256 is None:  # unpinned: nothing to compare with (the caller records the file's own digest)
        return
    actual = sha256_of(path)
    if not actual.startswith(spec.sha256):
        raise FidmedError(
            f"weights file {path} has the wrong sha256:\n  expected {spec.sha256}\n  actual   {actual}\n"
            f"The file is corrupt, truncated or a different version. Delete it and get {spec.filename} again"
            + (f" from {spec.urls[0]}" if spec.urls else "")
            + "."
        )


# ------------------------------------------------------------------------------------------------ download
def _probe(url: str, timeout: float) -> str | None:
    """None when the URL answers within ``timeout`` seconds, else the reason (DNS and connect included)."""
    result: list[str | None] = ["timed out after %.0f s" % timeout]

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


def _download(spec: WeightsSpec, target_dir: Path, timeout: float) -> tuple[Path | None, list[str]]:
    """Try each URL; returns (path or None, reasons for failures)."""
    reasons: list[str] = []
    for url in spec.urls:
        why = _probe(url, timeout)
        if why is not None:
            reasons.append(f"{url}: {why}")
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        tmp = target_dir / f".{spec.filename}.{os.getpid()}.partial"
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=None, progress=True)
            verify_weights(tmp, spec)
            final = target_dir / spec.filename
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
def missing_message(spec: WeightsSpec, weights_dir: Path | str | None, why_no_download: str) -> str:
    folder = _weights_dir(weights_dir)
    hash_note = ("" if spec.full_hash else " (unpinned: no published digest; the file is used as found and its own "
                 "sha256 is recorded with every number)" if spec.sha256 is None else
                 " (prefix; only a prefix of the digest is known)")
    lines = [
        f"weights file {spec.filename} not found" + (f" ({spec.description})" if spec.description else ""),
        f"  sha256: {spec.sha256}{hash_note}",
        f"  looked in: {', '.join(dict.fromkeys(str(p.parent) for p in search_paths(spec, weights_dir)))}"
        + "".join(f", {d}" for d in hf_cache_dirs(spec)),
        f"  not downloaded: {why_no_download}",
        "Fix: get the file on a machine with internet"
        + (f" from {' or '.join(spec.urls)}" if spec.urls else "")
        + f", then either copy it into {folder} (or the folder $FIDMED_WEIGHTS names)"
        f" or run `fidmed weights import PATH`; or allow downloads when online.",
    ]
    if spec.how_to:
        lines.append(f"  {spec.how_to}")
    return "\n".join(lines)


def find_weights(spec: WeightsSpec, weights_dir: Path | str | None = None) -> Path | None:
    """The first existing candidate (verified; a wrong hash raises), or None."""
    for path in search_paths(spec, weights_dir):
        if path.is_file():
            verify_weights(path, spec)
            return path
    return None


def resolve_weights(
    spec: WeightsSpec,
    weights_dir: Path | str | None = None,
    allow_download: bool = False,
    timeout: float = PROBE_TIMEOUT_S,
) -> Path:
    """Path of a verified local copy of ``spec``; downloads only when allowed and online.

    Raises ``WeightsMissingError`` (naming the file, its sha256, the URL, the folder and the import command) when
    the file is nowhere and cannot be downloaded, and ``FidmedError`` when a file is found with the wrong hash.
    """
    found = find_weights(spec, weights_dir)
    if found is not None:
        return found
    if not allow_download:
        why = "downloads are not allowed for this run"
    elif is_offline():
        why = "offline (HF_HUB_OFFLINE=1 or FIDMED_OFFLINE=1 is set)"
    elif not spec.urls:
        why = "no download URL is known for this file"
    else:
        path, reasons = _download(spec, _weights_dir(weights_dir), timeout)
        if path is not None:
            return path
        why = "download failed: " + "; ".join(reasons)
    raise WeightsMissingError(missing_message(spec, weights_dir, why))


def import_weights(
    src: Path | str, specs: Iterable[WeightsSpec], weights_dir: Path | str | None = None
) -> tuple[WeightsSpec, Path]:
    """Copy a user-supplied file into the weights folder (for ``fidmed weights import PATH``).

    The file is matched to a known spec by its sha256 (so a renamed download is recognised), copied under the
    spec's file name through a temporary file and an atomic rename. Raises FidmedError when no spec matches.
    """
    src = Path(src).expanduser()
    if not src.is_file():
        raise FidmedError(f"{src} is not a file")
    digest = sha256_of(src, use_cache=False)
    specs = list(specs)
    match = [s for s in specs if s.sha256 is not None and digest.startswith(s.sha256)]
    if not match:  # unpinned specs are recognised by their file name (there is no digest to match)
        match = [s for s in specs if s.sha256 is None and s.filename == src.name]
    if not match:
        known = "\n".join(f"  {s.filename}  sha256 {s.sha256}" for s in specs)
        raise FidmedError(f"{src} (sha256 {digest}) matches no known weights file. Known files:\n{known}")
    spec = match[0]
    if spec.filename.endswith(".h5"):
        # a Keras .h5 (RadImageNet, Keras ImageNet): it must load into its architecture layer by layer, and match
        # Keras' published md5 where there is one, before it enters the weights folder
        from fidmed.features.keras_nets import check_keras_h5

        check_keras_h5(src, spec.filename)
    folder = _weights_dir(weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / spec.filename
    tmp = folder / f".{spec.filename}.{os.getpid()}.partial"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    verify_weights(final, spec)
    return spec, final
