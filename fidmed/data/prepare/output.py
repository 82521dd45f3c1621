"""The output folder of ``fidmed prepare``: its checks, the atomic image writer, the resume state and the manifest.

Layout of ``--out``:

* ``<name>.png``: flat, 8-bit grey PNGs, each written to a hidden temporary file (``.fidmed-tmp-*``) and renamed,
  so a killed run never leaves a partial image under a real name.
* ``manifest.json``: the preparer, its parameters and steps, the source files, counts, image sizes, skipped
  files/slices with reasons, and a hash of all output pixels. Deterministic: re-running with the same inputs
  rewrites the same bytes. ``ImageFolderDataset`` folds its sha256 into its own manifest hash, which keys the
  evaluation cache. Removed while work is pending and written at the end, so a folder with a state folder but no
  manifest is an unfinished preparation (the folder dataset refuses it).
* ``.fidmed_prepare/state.jsonl``: a header line with the parameters, then one record per finished source (its
  files' sizes and mtimes, outputs and their pixel hashes); what a re-run resumes from.
* ``.fidmed_prepare/written-<pid>.txt``: every image name a process is about to write, before it writes it. An
  image that is in no record but in these journals was written by a run stopped before it recorded its source
  (it is redone or removed); an image in neither was not written by ``fidmed prepare``, and the folder is refused
  rather than touched. Removed at the end of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fidmed.data.folder import PREPARE_MANIFEST, PREPARE_STATE_DIRNAME, list_image_files
from fidmed.data.prepare.pixels import pixels_sha256
from fidmed.errors import DataError

if TYPE_CHECKING:
    from fidmed.data.prepare.preparer import Preparer

FORMAT_VERSION = 1
MANIFEST_NAME = PREPARE_MANIFEST  # the name ImageFolderDataset looks for
STATE_DIRNAME = PREPARE_STATE_DIRNAME
STATE_FILE = "state.jsonl"
JOURNAL_PREFIX = "written-"
TMP_PREFIX = ".fidmed-tmp-"
OUTPUT_SUFFIX = ".png"


# -- checking and creating --out --------------------------------------------------------------------------------


def make_output_folder(out: Path) -> list[Path]:
    """Check ``out`` before any work, create it, and return the folders this created (outermost first).

    A file where the folder (or one of its parents) should be, a folder that cannot be created, or one this
    process cannot write into is a :class:`DataError` naming the fix; nothing is created then.
    """
    if out.exists() and not out.is_dir():
        raise DataError(
            f"--out {out} is a file, not a folder; pass the folder to write the images into (it is "
            f"created when missing), or move the file away."
        )
    missing, existing = [], out
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(
            f"--out {out}: {existing} is a file, not a folder; pass a folder path whose parents are folders."
        )
    if missing:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            remove_created(list(reversed(missing)))
            raise DataError(
                f"cannot create --out {out} ({exc.strerror or exc}); choose a folder you can write to."
            ) from exc
    created = list(reversed(missing))
    for folder in (out, out / STATE_DIRNAME):
        if folder.is_dir():
            try:
                _write_probe(folder)
            except OSError as exc:
                remove_created(created)
                raise DataError(
                    f"cannot write into {folder} ({exc.strerror or exc}); choose an --out folder you "
                    f"can write to, or make this one writable."
                ) from exc
    return created


def _write_probe(folder: Path) -> None:
    probe = folder / f"{TMP_PREFIX}{os.getpid()}-write-check"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.unlink(probe)


def remove_created(created: list[Path]) -> None:
    """Remove the folders :func:`make_output_folder` created, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def image_files(out: Path) -> list[str]:
    """Relative paths of every image under ``out`` (as the folder dataset would load them)."""
    return [f.relpath for f in list_image_files(out)]


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files of interrupted writes (``.fidmed-tmp-*``) in ``out`` and its state folder."""
    for folder in (out, out / STATE_DIRNAME):
        if folder.is_dir():
            for leftover in folder.glob(f"{TMP_PREFIX}*"):
                leftover.unlink(missing_ok=True)


# -- writing images ---------------------------------------------------------------------------------------------


class Emitter:
    """Receives one source's outputs: writes each image atomically and tallies skips and counters."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.journal = out / STATE_DIRNAME / f"{JOURNAL_PREFIX}{os.getpid()}.txt"
        self.outputs: list[tuple[str, str, int, int]] = []  # (name, pixels sha256, height, width)
        self.skipped: list[tuple[str, str]] = []  # (where, reason)
        self.file_errors: list[str] = []  # reasons of unreadable files inside this source (strict stops on them)
        self.counts: Counter[str] = Counter()

    def image(self, name: str, pixels: np.ndarray) -> None:
        """Write ``pixels`` (2-D uint8) as ``<out>/<name>`` (PNG): the name goes into this process's journal, the
        pixels into a temporary file, which is then renamed."""
        import PIL.Image

        if pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise TypeError(f"expected a 2-D uint8 image, got {pixels.dtype} {pixels.shape}")
        if "/" in name or not name.endswith(OUTPUT_SUFFIX) or name.startswith("."):
            raise ValueError(f"bad output name {name!r}")
        if not self.outputs:  # the first image of this source (run_prepare has created the folder already)
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(name) + "\n")
        final = self.out / name
        tmp = self.out / f"{TMP_PREFIX}{os.getpid()}-{name}"
        PIL.Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", compress_level=6)  # mode L
        os.replace(tmp, final)
        self.outputs.append((name, pixels_sha256(pixels), int(pixels.shape[0]), int(pixels.shape[1])))
        self.counts["images"] += 1

    def skip(self, where: str, reason: str, counter: str, file_error: bool = False) -> None:
        """Record a slice (or frame, or file of a series) that is left out for a reason worth listing (e.g. a
        constant slice). ``file_error``: an unreadable file, which stops a ``strict`` run."""
        self.skipped.append((where, reason))
        self.counts[counter] += 1
        if file_error:
            self.file_errors.append(reason)

    def count(self, counter: str, n: int = 1) -> None:
        self.counts[counter] += n

    def discard(self) -> None:
        """Delete what this source wrote so far (the source turned out bad half-way)."""
        for name, *_ in self.outputs:
            (self.out / name).unlink(missing_ok=True)
        self.outputs.clear()


# -- the resume state -------------------------------------------------------------------------------------------


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class ResumeState:
    """``<out>/.fidmed_prepare/``: ``state.jsonl`` (a header line with the parameters, then one record per
    finished source, appended as sources finish; the last record of a key wins; a torn last line is ignored) and
    the journals of the image names being written."""

    def __init__(self, out: Path) -> None:
        self.dir = out / STATE_DIRNAME
        self.path = self.dir / STATE_FILE

    def load(self) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        if not self.path.is_file():
            return None, {}
        header, records = None, {}
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn write of an interrupted run
                if header is None:
                    header = item.get("header")
                    continue
                records[item["key"]] = item
        return header, records

    def rewrite(self, header: dict[str, Any], records: Iterable[dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{STATE_FILE}"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(canonical({"header": header}) + "\n")
            for record in records:
                handle.write(canonical(record) + "\n")
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(canonical(record) + "\n")
            handle.flush()

    def journaled(self) -> set[str]:
        """Every image name a run of this folder was about to write (see the module docstring)."""
        names: set[str] = set()
        for journal in sorted(self.dir.glob(f"{JOURNAL_PREFIX}*.txt")) if self.dir.is_dir() else ():
            with open(journal, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        names.add(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # torn write
        return names

    def clear_journals(self) -> None:
        if self.dir.is_dir():
            for journal in self.dir.glob(f"{JOURNAL_PREFIX}*.txt"):
                journal.unlink(missing_ok=True)


def recorded_outputs(records: Iterable[dict[str, Any]]) -> set[str]:
    """The image names the given state records hold."""
    return {o[0] for record in records for o in record["outputs"]}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{path.name}"
    tmp.write_text(
        json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n", encoding="ascii"
    )
    os.replace(tmp, path)


# -- the manifest -----------------------------------------------------------------------------------------------


def build_manifest(
    preparer: Preparer,
    header: dict[str, Any],
    records: list[dict[str, Any]],
    discovery_skipped: list[tuple[str, str]],
    src: Path,
) -> dict[str, Any]:
    """The manifest of a finished run (deterministic: no time stamps; paths in reasons relative to ``src``)."""
    prefixes = sorted({f"{src}{os.sep}", f"{src.resolve()}{os.sep}"}, key=len, reverse=True)

    def relative(reason: str) -> str:
        for prefix in prefixes:
            reason = reason.replace(prefix, "")
        return reason

    counts: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    content = hashlib.sha256()
    sources, skipped = [], []
    for rel, reason in discovery_skipped:
        skipped.append({"source": rel, "where": None, "reason": relative(reason)})
    for record in records:
        counts.update(record["counts"])
        ok = record["status"] == "ok"
        counts["sources_ok" if ok else "sources_bad"] += 1
        if not ok:
            skipped.append({"source": record["key"], "where": None, "reason": relative(record["reason"])})
        for where, reason in record["skipped"]:
            skipped.append({"source": record["key"], "where": where, "reason": relative(reason)})
        sources.append(
            {
                "key": record["key"],
                "status": record["status"],
                "images": len(record["outputs"]),
                "files": [[rel, size] for rel, size, _mtime in record["files"]],
            }
        )
        for _name, _sha, height, width in record["outputs"]:
            sizes[(height, width)] += 1
    outputs = sorted(o for record in records for o in record["outputs"])
    for name, sha, *_ in outputs:
        content.update(f"{name}\t{sha}\n".encode())
    counts["images"] = len(outputs)
    counts["files_skipped_at_discovery"] = len(discovery_skipped)
    info = preparer.info
    return {
        "fidmed_prepare": FORMAT_VERSION,
        "preparer": preparer.name,
        "preparer_version": info.version,
        "study_script": info.study_script,
        "params": header["params"],
        "params_sha256": hashlib.sha256(canonical(header).encode("ascii")).hexdigest(),
        "steps": preparer.steps(),
        "channels": 1,
        "image_sizes": [{"height": h, "width": w, "count": n} for (h, w), n in sorted(sizes.items())],
        "counts": dict(sorted(counts.items())),
        "content_sha256": content.hexdigest(),
        "skipped": skipped,
        "sources": sources,
    }
