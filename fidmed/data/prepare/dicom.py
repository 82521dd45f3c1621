"""A folder of DICOM series (a user's own scanner data) to 8-bit slices. Not part of the study.

Discovery reads every candidate file's header (extension .dcm/.dicom/.ima, none, or numeric, as scanners name
them) with pydicom and groups image files (those with Rows/Columns) by SeriesInstanceUID (files without one are
grouped by folder). Other files are ignored, as are DICOM files without an image (DICOMDIR, reports, RT
structures); files that look like DICOM but cannot be parsed are listed as skipped.

Each series is one source: its files are read (pixel data through pydicom, so compressed transfer syntaxes need
pydicom's optional decoders), the Modality LUT is applied (RescaleSlope/Intercept: Hounsfield units for CT),
multi-frame files are split into frames, and the slices are sorted along the slice normal (the cross product of
ImageOrientationPatient's row and column directions, dotted with ImagePositionPatient), falling back to
InstanceNumber and file name. Then:

* ``slices``: ``"all"``, ``"middle"`` (one slice per series), or a Python slice ``"A:B"`` / ``"A:B:K"`` over the
  sorted slices (negative indices count from the end);
* ``square``: ``"pad"`` pads non-square slices to a square with the slice minimum (centred, the odd pixel after), or
  ``"none"`` keeps them (the training loader needs square images of one size);
* ``window``: ``"minmax"`` min-max rescales each slice to [0, 255] (the study's CT step; constant slices are
  skipped and listed, or written black with ``constant="zero"``), ``"volume"`` min-max over the whole series,
  ``"dicom"`` applies each file's first WindowCenter/WindowWidth, and ``"C,W"`` (e.g. ``"40,400"``) a fixed
  window in modality units; windows use DICOM's linear VOI function (PS3.3 C.11.2.1.2.1);
* MONOCHROME1 images are inverted (``255 - v``) so that higher values are brighter, as in MONOCHROME2;
* ``resolution``: optional resize to ``resolution x resolution`` (PIL bicubic on float32);
* quantisation to uint8, written as ``<PatientID>_<SeriesNumber>_<uid hash>_<index>.png`` (index = position in
  the sorted series).

Colour images, series mixing slice sizes and unreadable files are skipped and listed (or stop the run with
``strict``); a file that fails inside an otherwise good series is left out of it and listed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fidmed.data.prepare.cli import add_quantize_argument, positive_int
from fidmed.data.prepare.output import Emitter
from fidmed.data.prepare.pixels import Quantize, centered_pad_split, minmax_to_255, resize_float, to_uint8
from fidmed.data.prepare.preparer import PREPARERS, BadSource, Preparer, PreparerInfo, require_medical
from fidmed.data.prepare.sources import Discovery, Source, list_files
from fidmed.errors import ConfigError, DataError

_DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
_WINDOW_RE = re.compile(r"^\s*(-?\d+(\.\d*)?)\s*,\s*(\d+(\.\d*)?)\s*$")
_SLICE_RE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(:\s*(-?\d*)\s*)?$")


def parse_window(window: str) -> tuple[str, tuple[float, float] | None]:
    """``"minmax" | "volume" | "dicom" | "C,W"`` -> (mode, (center, width) or None)."""
    if window in ("minmax", "volume", "dicom"):
        return window, None
    match = _WINDOW_RE.match(window)
    if not match:
        raise ConfigError(f"--window {window!r}: use minmax, volume, dicom, or CENTER,WIDTH (e.g. 40,400)")
    center, width = float(match.group(1)), float(match.group(3))
    if width < 1:
        raise ConfigError(f"--window {window!r}: the width must be at least 1")
    return "fixed", (center, width)


def parse_slices(spec: str) -> slice | Literal["middle"]:
    """``"all" | "middle" | "A:B" | "A:B:K"`` -> a slice object or "middle"."""
    if spec == "all":
        return slice(None)
    if spec == "middle":
        return "middle"
    match = _SLICE_RE.match(spec)
    if not match:
        raise ConfigError(f"--slices {spec!r}: use all, middle, or a Python slice START:STOP[:STEP] (e.g. 10:-10:2)")
    parts = [match.group(1), match.group(2), match.group(4)]
    values = [int(p) if p not in (None, "", "-") else None for p in parts]
    if values[2] is not None and values[2] <= 0:
        raise ConfigError(f"--slices {spec!r}: the step must be positive")
    return slice(*values)


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) to [0, 255], in float64."""
    low = center - 0.5 - (width - 1.0) / 2.0
    high = center - 0.5 + (width - 1.0) / 2.0
    out = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0 if width > 1 else np.zeros_like(values)
    out = np.where(values <= low, 0.0, out)
    return np.where(values > high, 255.0, out)


def _safe(text: Any, default: str) -> str:
    text = re.sub(r"[^A-Za-z0-9.-]+", "-", str(text or "").strip()).strip("-.")
    return text[:40] or default


def _modality_lut(pixels: np.ndarray, ds: Any) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DICOM number."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


@dataclass
class _Slice:
    sort_key: tuple
    values: np.ndarray  # float64 [rows, cols], modality units
    window: tuple[float, float] | None  # the file's first WindowCenter/Width
    inverted: bool  # MONOCHROME1
    where: str


@PREPARERS.register(
    "dicom",
    info=PreparerInfo(
        help="a folder of DICOM series -> windowed 8-bit slices (not in the study)",
        description="""\
A folder of DICOM series (your own scanner data; not part of the study) to 8-bit slices: the files are grouped
by SeriesInstanceUID, the Modality LUT is applied (Hounsfield units for CT), multi-frame files are split, the
slices are sorted along the slice normal, then windowed (--window), optionally selected (--slices), padded to a
square (--square) and resized (--resolution). MONOCHROME1 images are inverted.""",
        example="--src DICOM/ --out data/mine [--window 40,400] [--slices 10:-10] [--resolution 256]",
        version="dicom-1",
    ),
)
@dataclass(frozen=True)
class DicomPreparer(Preparer):
    """DICOM series to 8-bit slices (see the module docstring)."""

    window: str = "minmax"
    slices: str = "all"
    square: Literal["pad", "none"] = "pad"
    resolution: int | None = None
    constant: Literal["skip", "zero"] = "skip"
    quantize: Quantize = "round"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--window",
            default="minmax",
            help="minmax (per slice; default), volume (per series), dicom (the files' "
            "WindowCenter/Width) or CENTER,WIDTH in modality units, e.g. 40,400",
        )
        parser.add_argument(
            "--slices",
            default="all",
            help="all (default), middle, or START:STOP[:STEP] over each series' sorted slices",
        )
        parser.add_argument(
            "--square",
            choices=("pad", "none"),
            default="pad",
            help="pad non-square slices to a square with the slice minimum (default) or keep them",
        )
        parser.add_argument("--resolution", type=positive_int, default=None, help="resize to N x N (default: native)")
        parser.add_argument(
            "--constant",
            choices=("skip", "zero"),
            default="skip",
            help="constant slices under --window minmax: skip and list (default) or write black",
        )
        add_quantize_argument(parser)

    def __post_init__(self) -> None:
        parse_window(self.window)
        parse_slices(self.slices)

    def steps(self) -> list[str]:
        mode, fixed = parse_window(self.window)
        window = {
            "minmax": "per-slice min-max to [0, 255] (float64)",
            "volume": "min-max over the whole series to [0, 255] (float64)",
            "dicom": "each file's first WindowCenter/WindowWidth, DICOM linear VOI function to [0, 255]",
            "fixed": f"window center {fixed[0] if fixed else ''}, width {fixed[1] if fixed else ''}, "
            f"DICOM linear VOI function to [0, 255]",
        }[mode]
        steps = [
            "every DICOM image file under --src (recursively), grouped by SeriesInstanceUID",
            "pixel data through pydicom, Modality LUT (RescaleSlope/Intercept), multi-frame files split",
            "slices sorted by position along the slice normal, then InstanceNumber, then file name",
            f"slices: {self.slices}",
            "non-square slices padded to a square with the slice minimum"
            if self.square == "pad"
            else "non-square slices kept as they are",
            window,
            f"constant slices (min = max) under min-max: {self.constant}",
            "MONOCHROME1 inverted (255 - v)",
        ]
        if self.resolution is not None:
            steps.append(f"resize to {self.resolution}x{self.resolution} (PIL bicubic on float32)")
        steps.append(f"{self.quantize} to uint8; output <PatientID>_<SeriesNumber>_<uid hash>_<index>.png")
        return steps

    # -- discovery ----------------------------------------------------------------------------------------------
    def discover(self, src: Path) -> Discovery:
        pydicom = require_medical("pydicom")
        groups: dict[str, list[str]] = defaultdict(list)
        skipped: list[tuple[str, str]] = []
        candidates = [
            rel
            for rel in list_files(src)
            if Path(rel).suffix.lower() in _DICOM_SUFFIXES or Path(rel).suffix[1:].isdigit()
        ]
        for rel in candidates:
            try:
                ds = pydicom.dcmread(src / rel, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue  # not DICOM (no preamble and no recognisable header)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged headers
                skipped.append((rel, f"cannot parse {src / rel} as DICOM ({type(exc).__name__}: {exc})"))
                continue
            if "Rows" not in ds or "Columns" not in ds:
                continue  # no image (DICOMDIR, structured report, RT structure set ...)
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            groups[uid or f"folder:{Path(rel).parent.as_posix()}"].append(rel)
        if not groups:
            raise DataError(
                f"no DICOM image files under {src}; point --src at a folder of DICOM series "
                f"(files named *.dcm, *.ima, or without extension)."
            )
        return Discovery([Source(key, tuple(sorted(files))) for key, files in sorted(groups.items())], skipped)

    # -- conversion ---------------------------------------------------------------------------------------------
    def _read_file(self, path: Path, rel: str, emit: Emitter) -> tuple[list[_Slice], Any]:
        pydicom = require_medical("pydicom")
        try:
            ds = pydicom.dcmread(path, force=True)
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
            if photometric not in ("MONOCHROME1", "MONOCHROME2"):
                emit.skip(
                    rel,
                    f"{path} is a colour image ({photometric}); fidmed prepares grey images only",
                    "skipped_files",
                    file_error=True,
                )
                return [], None
            pixels = ds.pixel_array
            values = _modality_lut(pixels, ds)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on truncated/compressed data
            emit.skip(
                rel,
                f"cannot decode the pixel data of {path} ({type(exc).__name__}: {exc})",
                "skipped_files",
                file_error=True,
            )
            return [], None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames == 1 and values.ndim == 2:
            values = values[None]
        if values.ndim != 3 or not np.isfinite(values).all():
            emit.skip(
                rel,
                f"{path} decoded to an array of shape {values.shape} or holds NaN; expected grey frames",
                "skipped_files",
                file_error=True,
            )
            return [], None
        position = None
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            orient = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
            normal = np.cross(orient[:3], orient[3:])
            position = float(np.dot(normal, np.asarray([float(v) for v in ds.ImagePositionPatient])))
        instance = ds.get("InstanceNumber")
        instance = int(instance) if instance not in (None, "") else None
        window = None
        if "WindowCenter" in ds and "WindowWidth" in ds:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        out = []
        for f, frame in enumerate(values):
            key = (position is None, position or 0.0, instance is None, instance or 0, rel, f)
            out.append(
                _Slice(key, frame, window, photometric == "MONOCHROME1", rel if frames == 1 else f"{rel} frame {f}")
            )
        return out, ds

    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        slices: list[_Slice] = []
        header = None
        for rel in source.files:
            found, ds = self._read_file(src / rel, rel, emit)
            slices.extend(found)
            header = header if header is not None else ds
        if not slices:
            raise BadSource(f"series {source.key} (first file {src / source.files[0]}): no readable grey image")
        shapes = sorted({s.values.shape for s in slices})
        if len(shapes) > 1:
            raise BadSource(
                f"series {source.key} (first file {src / source.files[0]}) mixes slice sizes "
                f"{shapes}; split it into separate folders."
            )
        slices.sort(key=lambda s: s.sort_key)
        mode, fixed = parse_window(self.window)
        if mode == "volume":
            low = min(float(s.values.min()) for s in slices)
            high = max(float(s.values.max()) for s in slices)
            if low == high:
                raise BadSource(f"series {source.key} (first file {src / source.files[0]}) is constant ({low})")
        selection = parse_slices(self.slices)
        indices = list(range(len(slices)))
        chosen = [indices[len(indices) // 2]] if selection == "middle" else indices[selection]
        uid_hash = hashlib.sha1(source.key.encode("utf-8")).hexdigest()[:8]
        prefix = f"{_safe(header.get('PatientID'), 'anon')}_{_safe(header.get('SeriesNumber'), 'series')}_{uid_hash}"
        for k in chosen:
            item = slices[k]
            emit.count("slices")
            raw = item.values
            if self.square == "pad" and raw.shape[0] != raw.shape[1]:
                side = max(raw.shape)
                top, bottom = centered_pad_split(side - raw.shape[0])
                left, right = centered_pad_split(side - raw.shape[1])
                raw = np.pad(raw, ((top, bottom), (left, right)), constant_values=raw.min())
            if mode == "minmax":
                if raw.min() == raw.max():
                    if self.constant == "skip":
                        emit.skip(item.where, f"constant slice (all {raw.min()})", "skipped_constant")
                        continue
                    values = np.zeros(raw.shape, dtype=np.float64)
                else:
                    values = minmax_to_255(raw)
            elif mode == "volume":
                values = (raw - low) * 255.0 / (high - low)
            else:
                center_width = fixed if mode == "fixed" else item.window
                if center_width is None:
                    emit.skip(
                        item.where,
                        "no WindowCenter/WindowWidth in the file (use another --window)",
                        "skipped_no_window",
                    )
                    continue
                values = apply_window(raw, *center_width)
            if item.inverted:
                values = 255.0 - values
            if self.resolution is not None:
                values = resize_float(values, self.resolution)
            emit.image(f"{prefix}_{k:04d}.png", to_uint8(values, self.quantize))
