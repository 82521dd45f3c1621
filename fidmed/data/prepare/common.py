"""Shared machinery of ``fidmed prepare``: sources, output writing, resume, parallel runs and the manifest.

A *preparer* (one per source dataset, see the sibling modules) says which *sources* a raw folder holds (a file,
or for DICOM a series of files) and turns one source into 2-D uint8 images. :func:`run_prepare` does the rest:

* **Output**: a flat folder of 8-bit grey PNGs, each written to a hidden temporary file and renamed, so a killed
  run never leaves a partial image; plus ``manifest.json`` (the preparer, its parameters and steps, the source
  files, counts, image sizes, skipped files/slices with reasons, and a hash of all output pixels). The
  manifest is deterministic: re-running with the same inputs rewrites the same bytes. ``ImageFolderDataset``
  folds the manifest's sha256 into its own manifest hash, which keys the evaluation cache.
* **Resume**: ``<out>/.fidmed_prepare/state.jsonl`` gets one line per finished source (its files' sizes and
  mtimes, outputs and their pixel hashes). A re-run skips sources whose record matches and whose outputs
  exist, and redoes the rest. ``manifest.json`` is removed while work is pending and written at the end, so a
  folder with a state folder but no manifest is an unfinished preparation (the folder dataset refuses it).
* **Parameters**: a folder prepared with other parameters is refused (the differences are listed) unless
  ``overwrite`` is set, which deletes the images the earlier run recorded (never other files).
* **Bad sources** (unreadable, truncated, NaN, wrong dimensionality, 16-bit where 8-bit is expected ...): the
  preparer raises :class:`BadSource`; by default the source is skipped and listed (on the console and in the
  manifest's ``skipped``), with ``strict`` the run stops with the file's name.
* **Parallelism**: sources are converted in worker processes (``spawn``; ITK uses one thread per worker)
  with a tqdm progress bar; ``workers=1`` converts in this process.

Pixel conventions shared by the preparers: a 2-D image is a numpy array indexed ``[row, column]`` exactly as
``SimpleITK.GetArrayFromImage`` returns a slice (row = the image's y index), which is how the study's training
code (its stylegan2-ada-pytorch fork reads NIfTI slices with SimpleITK) saw its images. The study's scripts wrote
float NIfTI slices in [0, 255]; fidmed writes 8-bit PNGs, rounding to the nearest integer by default
(``quantize="round"``; ``"floor"`` truncates instead). How the study made 8-bit files from its NIfTI slices for
the FD tools is not in its code (unconfirmed), hence the option.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from fidmed.data.folder import PREPARE_MANIFEST, PREPARE_STATE_DIRNAME, list_image_files
from fidmed.errors import DataError

log = logging.getLogger("fidmed.prepare")

FORMAT_VERSION = 1
MANIFEST_NAME = PREPARE_MANIFEST  # the name ImageFolderDataset looks for
STATE_DIRNAME = PREPARE_STATE_DIRNAME
STATE_FILE = "state.jsonl"
TMP_PREFIX = ".fidmed-tmp-"
OUTPUT_SUFFIX = ".png"
QUANTIZE_MODES = ("round", "floor")
Quantize = Literal["round", "floor"]


class BadSource(DataError):
    """One source cannot be prepared (unreadable, truncated, NaN, wrong shape ...); the message says why.

    :func:`run_prepare` skips the source and lists it, or stops with ``strict``.
    """


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


# -- pixel helpers shared by preparers --------------------------------------------------------------------------

def to_uint8(values: np.ndarray, quantize: Quantize = "round") -> np.ndarray:
    """Values in [0, 255] (any float or integer dtype) to uint8: clip to [0, 255], then round to nearest
    (``np.rint``, ties to even) or truncate (``floor``)."""
    if values.dtype == np.uint8:
        return values
    work = np.clip(np.asarray(values, dtype=np.float64), 0.0, 255.0)
    work = np.rint(work) if quantize == "round" else np.floor(work)
    return work.astype(np.uint8)


def minmax_to_255(values: np.ndarray) -> np.ndarray:
    """The study's ``convert_range(x, x.min(), x.max(), 0, 255)`` (utils/prepare_sliver07.py), with numpy's
    dtype rules: integer input is computed in float64 (exact, as the study's int16 differences times the float
    255.0 were), float input in its own precision. The caller must have excluded min == max."""
    work = values.astype(np.float64) if np.issubdtype(values.dtype, np.integer) else values
    low, high = work.min(), work.max()
    return (work - low) * 255.0 / (high - low) + 0.0


def study_pad_split(pad: int) -> tuple[int, int]:
    """The study's ``pad_image`` split of ``pad`` pixels, exactly (prepare_MSDbt.py and prepare_ACDC.py): even ->
    (pad/2, pad/2); odd -> (pad//2 - 1, pad//2 + 1), which adds up to ``pad - 1``: an odd padding leaves the
    image one pixel short of the target. (For pad = 1 it gives (-1, 1), on which the study's scripts crash;
    the callers say what fidmed does then.)"""
    if pad < 0:
        raise ValueError(f"negative padding {pad}")
    if pad % 2 == 0:
        return pad // 2, pad // 2
    return pad // 2 - 1, pad // 2 + 1


def centered_pad_split(pad: int) -> tuple[int, int]:
    """``pad`` pixels split as evenly as possible, the odd one after: (pad//2, pad - pad//2)."""
    return pad // 2, pad - pad // 2


def resize_float(values: np.ndarray, size: int) -> np.ndarray:
    """Square float image to ``size x size`` with PIL's bicubic filter on float32 (mode 'F': no intermediate
    quantisation, antialiased when shrinking). Used by the ``--resolution`` options, never by the study's
    default steps."""
    import PIL.Image

    if values.shape[0] != values.shape[1]:
        raise BadSource(f"image of {values.shape[1]}x{values.shape[0]} (WxH) is not square and cannot be resized "
                        f"to {size}x{size}")
    if values.shape == (size, size):
        return values
    image = PIL.Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))  # mode F
    return np.asarray(image.resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float32)


def pixels_sha256(pixels: np.ndarray) -> str:
    """sha256 of a uint8 image's shape and bytes (independent of the PNG encoder)."""
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode("ascii"))
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def require_medical(module: str) -> Any:
    """Import one of the optional medical-format libraries with an install hint when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(f"`fidmed prepare` needs {module} for this format; install the medical extras: "
                        f"pip install 'fidmed[medical]' ({exc})") from exc


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


def require_unique_stems(src: Path, files: list[str], suffixes: tuple[str, ...]) -> None:
    """The output folder is flat and output names start with the source's file name without ``suffixes``: two
    sources with the same stem in different sub-folders would overwrite each other's images. Refuse them."""
    seen: dict[str, str] = {}
    for rel in files:
        stem = strip_suffix(Path(rel).name, suffixes)
        if stem in seen:
            raise DataError(f"{src / seen[stem]} and {src / rel} have the same name; the output folder is flat, "
                            f"so prepare them separately (or point --src at one of their folders).")
        seen[stem] = rel


def strip_suffix(name: str, suffixes: Iterable[str]) -> str:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive)."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: len(name) - len(suffix)]
    return name


# -- preparers --------------------------------------------------------------------------------------------------

class Emitter:
    """Receives one source's outputs: writes each image atomically and tallies skips and counters."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.outputs: list[tuple[str, str, int, int]] = []  # (name, pixels sha256, height, width)
        self.skipped: list[tuple[str, str]] = []  # (where, reason)
        self.file_errors: list[str] = []  # reasons of unreadable files inside this source (strict stops on them)
        self.counts: Counter[str] = Counter()

    def image(self, name: str, pixels: np.ndarray) -> None:
        """Write ``pixels`` (2-D uint8) as ``<out>/<name>`` (PNG) via a temporary file and a rename."""
        import PIL.Image

        if pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise TypeError(f"expected a 2-D uint8 image, got {pixels.dtype} {pixels.shape}")
        if "/" in name or not name.endswith(OUTPUT_SUFFIX) or name.startswith("."):
            raise ValueError(f"bad output name {name!r}")
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


class Preparer(abc.ABC):
    """One source dataset's preparation. Subclasses are frozen dataclasses whose fields are the parameters
    (recorded in the manifest; any change means a different prepared set)."""

    name: ClassVar[str]
    # Bump when the outputs for the same parameters change (a fix): it is part of the recorded parameters.
    version: ClassVar[str]
    # The study's script this preparer reproduces, or None.
    study_script: ClassVar[str | None] = None

    def params(self) -> dict[str, Any]:
        """The parameters as JSON-able values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    @abc.abstractmethod
    def steps(self) -> list[str]:
        """The steps in words, with the parameters filled in (recorded in the manifest)."""

    @abc.abstractmethod
    def discover(self, src: Path) -> Discovery:
        """Find the sources under ``src``. Raise DataError (naming ``src`` and what was expected) when none."""

    @abc.abstractmethod
    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        """Turn one source into images via ``emit``; raise :class:`BadSource` when it cannot be used."""


# -- the run ----------------------------------------------------------------------------------------------------

@dataclass
class PrepareReport:
    """What :func:`run_prepare` did."""

    out: Path
    manifest: dict[str, Any]
    converted: int  # sources converted in this run
    reused: int  # sources finished by an earlier run and skipped
    skipped: list[dict[str, Any]]  # every skipped source or slice: {"source", "where", "reason"}

    @property
    def num_images(self) -> int:
        return int(self.manifest["counts"]["images"])


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _file_stats(src: Path, files: Iterable[str]) -> list[list[Any]]:
    stats = []
    for rel in files:
        st = (src / rel).stat()
        stats.append([rel, st.st_size, st.st_mtime_ns])
    return stats


def convert_source(preparer: Preparer, src: Path, out: Path, source: Source) -> dict[str, Any]:
    """Convert one source (in a worker process or in this one) and return its state record."""
    emit = Emitter(out)
    status, reason = "ok", None
    try:
        stats = _file_stats(src, source.files)
        preparer.convert(src, source, emit)
    except BadSource as exc:
        emit.discard()
        status, reason = "bad", str(exc)
    except FileNotFoundError as exc:
        emit.discard()
        stats = []
        status, reason = "bad", f"file vanished during the run ({exc})"
    return {"key": source.key, "files": stats, "status": status, "reason": reason,
            "outputs": [list(o) for o in emit.outputs], "skipped": [list(s) for s in emit.skipped],
            "file_errors": emit.file_errors,
            "counts": dict(sorted(emit.counts.items()))}


def _init_worker() -> None:
    try:  # one ITK thread per worker process: the processes are the parallelism
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:
        pass


class _State:
    """``<out>/.fidmed_prepare/state.jsonl``: a header line with the parameters, then one record per finished
    source (appended as sources finish; the last record of a key wins; a torn last line is ignored)."""

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
            handle.write(_canonical({"header": header}) + "\n")
            for record in records:
                handle.write(_canonical(record) + "\n")
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(_canonical(record) + "\n")
            handle.flush()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{path.name}"
    tmp.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n",
                   encoding="ascii")
    os.replace(tmp, path)


def _param_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _image_files(out: Path) -> list[str]:
    return [f.relpath for f in list_image_files(out)]


def _record_is_current(record: dict[str, Any] | None, src: Path, source: Source, out: Path) -> bool:
    if record is None or [r[0] for r in record["files"]] != list(source.files):
        return False
    try:
        if record["files"] != _file_stats(src, source.files):
            return False
    except FileNotFoundError:
        return False
    return all((out / o[0]).is_file() for o in record["outputs"])


def build_manifest(preparer: Preparer, header: dict[str, Any], records: list[dict[str, Any]],
                   discovery_skipped: list[tuple[str, str]], src: Path) -> dict[str, Any]:
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
        sources.append({"key": record["key"], "status": record["status"], "images": len(record["outputs"]),
                        "files": [[rel, size] for rel, size, _mtime in record["files"]]})
        for _name, _sha, height, width in record["outputs"]:
            sizes[(height, width)] += 1
    outputs = sorted(o for record in records for o in record["outputs"])
    for name, sha, *_ in outputs:
        content.update(f"{name}\t{sha}\n".encode("utf-8"))
    counts["images"] = len(outputs)
    counts["files_skipped_at_discovery"] = len(discovery_skipped)
    return {
        "fidmed_prepare": FORMAT_VERSION,
        "preparer": preparer.name,
        "preparer_version": preparer.version,
        "study_script": preparer.study_script,
        "params": header["params"],
        "params_sha256": hashlib.sha256(_canonical(header).encode("ascii")).hexdigest(),
        "steps": preparer.steps(),
        "channels": 1,
        "image_sizes": [{"height": h, "width": w, "count": n} for (h, w), n in sorted(sizes.items())],
        "counts": dict(sorted(counts.items())),
        "content_sha256": content.hexdigest(),
        "skipped": skipped,
        "sources": sources,
    }


def _iter_results(tasks: list[Source], convert: Callable[[Source], dict[str, Any]], workers: int,
                  preparer: Preparer, src: Path, out: Path) -> Iterator[dict[str, Any]]:
    """Records of ``tasks`` as they finish; at most ``4 * workers`` sources in flight."""
    if workers <= 1:
        for source in tasks:
            yield convert(source)
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        pending: set[cf.Future] = set()
        queue = iter(tasks)
        try:
            while True:
                while len(pending) < 4 * workers:
                    source = next(queue, None)
                    if source is None:
                        break
                    pending.add(pool.submit(convert_source, preparer, src, out, source))
                if not pending:
                    return
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def run_prepare(preparer: Preparer, src: str | os.PathLike, out: str | os.PathLike, *, workers: int | None = None,
                strict: bool = False, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Prepare every source under ``src`` into ``out`` (see the module docstring).

    Args:
        preparer: what to do (e.g. :class:`fidmed.data.prepare.ct.CTPreparer`).
        src: the raw dataset folder.
        out: the output folder (created); must not hold images that this tool did not write.
        workers: worker processes (default: the CPU count, at most 8); 1 converts in this process. Workers are
            spawned (each imports fidmed, a few seconds), so a script calling this with workers > 1 needs the
            usual ``if __name__ == "__main__":`` guard.
        strict: stop at the first bad source instead of skipping and listing it.
        overwrite: when ``out`` was prepared with other parameters, delete that run's images and start over.
        progress: show a progress bar.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "does not exist"
        raise DataError(f"source folder {src} {what}; pass the raw dataset's folder with --src.")
    if src.resolve() == out.resolve():
        raise DataError(f"--out {out} is the source folder; prepare into a separate folder.")
    out.mkdir(parents=True, exist_ok=True)
    discovery = preparer.discover(src)
    if src.resolve() in out.resolve().parents:  # an output folder inside the raw folder: never read it back
        out_rel = out.resolve().relative_to(src.resolve()).as_posix() + "/"
        discovery.sources = [s for s in discovery.sources if not any(f.startswith(out_rel) for f in s.files)]
    if not discovery.sources:
        raise DataError(f"no sources for `fidmed prepare {preparer.name}` in {src}; point --src at the raw "
                        f"dataset folder.")
    if strict and discovery.skipped:
        raise DataError(f"{discovery.skipped[0][1]} (--strict; without it the file is skipped and listed)")

    header = {"format": FORMAT_VERSION, "preparer": preparer.name, "version": preparer.version,
              "params": preparer.params()}
    state = _State(out)
    old_header, records = state.load()
    if old_header is not None and old_header != header:
        if not overwrite:
            differences = [d for d in (_param_diff(old_header.get("params", {}), header["params"]),
                                       _param_diff({"preparer": old_header.get("preparer"),
                                                    "version": old_header.get("version")},
                                                   {"preparer": header["preparer"], "version": header["version"]}))
                           if d]
            raise DataError(f"{out} was prepared by `fidmed prepare {old_header.get('preparer')}` with other "
                            f"parameters ({'; '.join(differences)}); choose another --out, or pass --overwrite to "
                            f"delete its images and start over.")
        for record in records.values():
            for name, *_ in record["outputs"]:
                (out / name).unlink(missing_ok=True)
        records = {}
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        state.path.unlink(missing_ok=True)

    for leftover in out.glob(f"{TMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)
    if state.dir.is_dir():
        for leftover in state.dir.glob(f"{TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
    if old_header is None:  # not a folder of ours (or a fresh one): it must hold no images
        foreign = _image_files(out)
    else:  # ours: images without a record are left-overs of an interrupted source, redone or removed below
        foreign = [rel for rel in _image_files(out) if "/" in rel]
    if foreign:
        raise DataError(f"{out} holds {len(foreign)} image(s) that `fidmed prepare` did not write (e.g. "
                        f"{out / foreign[0]}); prepare into an empty folder.")

    current_keys = {s.key for s in discovery.sources}
    for key in [k for k in records if k not in current_keys]:  # sources gone from --src: drop their images
        for name, *_ in records.pop(key)["outputs"]:
            (out / name).unlink(missing_ok=True)

    tasks = [s for s in discovery.sources if not _record_is_current(records.get(s.key), src, s, out)]
    task_keys = {s.key for s in tasks}
    for key in task_keys:  # redone from scratch: its old images go first
        for name, *_ in records.pop(key, {"outputs": []})["outputs"]:
            (out / name).unlink(missing_ok=True)
    if strict:
        bad = next((records[s.key] for s in discovery.sources if s.key in records
                    and (records[s.key]["status"] == "bad" or records[s.key]["file_errors"])), None)
        if bad is not None:
            raise DataError(f"{bad['reason'] or bad['file_errors'][0]} (--strict; recorded by an earlier run)")
    if tasks:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        state.rewrite(header, [records[s.key] for s in discovery.sources if s.key in records])

    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(tasks)))

    def convert(source: Source) -> dict[str, Any]:
        return convert_source(preparer, src, out, source)

    from tqdm.auto import tqdm

    names_seen = {o[0]: key for key, record in records.items() for o in record["outputs"]}
    bar = tqdm(total=len(tasks), desc=f"prepare {preparer.name}", unit="src", disable=not progress or not tasks,
               file=sys.stderr)
    images_this_run = 0
    try:
        for record in _iter_results(tasks, convert, workers, preparer, src, out):
            for name, *_ in record["outputs"]:
                other = names_seen.setdefault(name, record["key"])
                if other != record["key"]:
                    raise DataError(f"sources {other} and {record['key']} both produce {name}; rename one of "
                                    f"them or prepare them into separate folders.")
            if record["status"] == "bad" or record["file_errors"]:
                reason = record["reason"] or record["file_errors"][0]
                log.warning("skipped: %s", reason)
                if strict:
                    raise DataError(f"{reason} (--strict; without it the file is skipped and listed)")
            state.append(record)
            records[record["key"]] = record
            images_this_run += len(record["outputs"])
            bar.update(1)
            bar.set_postfix(images=images_this_run, refresh=False)
    finally:
        bar.close()

    final = [records[s.key] for s in discovery.sources]
    state.rewrite(header, final)
    produced = {o[0] for record in final for o in record["outputs"]}
    for rel in _image_files(out):
        if rel not in produced:  # written by a run killed before it recorded the source, and not redone
            log.info("removing %s (left over by an interrupted run)", out / rel)
            (out / rel).unlink()
    manifest = build_manifest(preparer, header, final, discovery.skipped, src)
    if manifest["counts"]["images"] == 0:
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in manifest["skipped"][:3])
        raise DataError(f"`fidmed prepare {preparer.name}` wrote no images from {src}"
                        f"{' (' + reasons + ')' if reasons else ''}; check --src and the options.")
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    return PrepareReport(out=out, manifest=manifest, converted=len(tasks), reused=len(discovery.sources) - len(tasks),
                         skipped=manifest["skipped"])
