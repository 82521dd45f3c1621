"""SLIVER07 liver CT: every axial slice of every MetaImage volume, min-max rescaled per slice to [0, 255]
(the study's utils/prepare_sliver07.py).

The study reads each ``*.mhd`` with SimpleITK's MetaImageIO and, for every slice ``i`` along the third axis,
computes ``(x - min) * 255 / (max - min)`` over that slice (no windowing, no resizing; the slices are 512x512) and
writes ``<name>_<i>``. fidmed writes ``<name>_<i>.png`` with the values rounded to uint8 (see
:mod:`fidmed.data.prepare.pixels` on quantisation). Point ``--src`` at the folder of scans (``liver-orig*.mhd``),
not at the one with the label volumes (``liver-seg*.mhd``), or narrow the selection with ``pattern``.

Where fidmed's result differs from the study's script:

* **A slice whose range exceeds 32767.** The study computes the formula on the int16 array SimpleITK returns for
  the SLIVER07 volumes, so ``x - min`` and ``max - min`` are int16 differences: exact while ``max - min`` is at
  most 32767 (fidmed's float64 computation then gives the study's values bit for bit), wrapped around modulo
  65536 beyond, where the study's script writes values outside [0, 255]. fidmed computes such a slice's true
  min-max in [0, 255] (:func:`fidmed.data.prepare.pixels.minmax_to_255`). Typical CT slices (about -3024 to a
  few thousand HU) are far from that range.
* **A constant slice** (min = max) makes the study's formula divide by zero (a NaN image); fidmed skips it and
  lists it (``constant="skip"``) or writes it black (``"zero"``, what SimpleITK's RescaleIntensity gives).

A volume holding NaN or infinity, one that is not 3-D, or an unreadable or truncated file is skipped (listed) or
stops the run with ``strict``.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fidmed.data.prepare.cli import add_quantize_argument, positive_int
from fidmed.data.prepare.output import Emitter
from fidmed.data.prepare.pixels import Quantize, minmax_to_255, resize_float, to_uint8
from fidmed.data.prepare.preparer import PREPARERS, BadSource, Preparer, PreparerInfo, require_medical
from fidmed.data.prepare.sources import Discovery, Source, list_files, require_unique_stems, strip_suffix
from fidmed.errors import DataError


def read_volume(path: Path, image_io: str = "") -> object:
    """SimpleITK image of ``path``, as a :class:`BadSource` when unreadable (truncated data, missing .raw ...)."""
    sitk = require_medical("SimpleITK")
    try:
        return sitk.ReadImage(str(path), imageIO=image_io)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line for line in lines if "ERROR" in line or "rror" in line), lines[-1] if lines else "")
        detail = re.sub(r"\(0x[0-9a-fA-F]+\)", "", detail).strip()  # ITK object addresses vary from run to run
        raise BadSource(f"cannot read {path} ({detail[:300]})") from exc


def finite_array(image: object, path: Path) -> np.ndarray:
    """The voxel array of a SimpleITK image; refuses NaN/infinity with the file's name."""
    sitk = require_medical("SimpleITK")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise BadSource(f"{path} holds {int(bad.sum())} NaN/infinite voxel(s); fix or remove the file.")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise BadSource(f"{path} has voxels of type {array.dtype}; expected a scalar grey-value image.")
    return array


def _metaimage_data_files(src: Path, rel: str) -> list[str]:
    """The separate data file(s) a MetaImage header names (``ElementDataFile = x.raw``), when they exist, so that
    a changed .raw also makes a re-run redo the volume."""
    try:
        with open(src / rel, "rb") as handle:
            head = handle.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", head, flags=re.MULTILINE)
    if not match or match.group(1).upper() in ("LOCAL", "LIST") or "%" in match.group(1):
        return []
    data = (Path(rel).parent / match.group(1)).as_posix()
    return [data] if (src / data).is_file() else []


@PREPARERS.register(
    "ct",
    info=PreparerInfo(
        help="SLIVER07 .mhd volumes -> every axial slice, per-slice min-max (the study's prepare_sliver07.py)",
        description="""\
SLIVER07 liver CT: every axial slice of every MetaImage volume under --src (the liver-orig*.mhd scans with their
.raw files), min-max rescaled per slice to [0, 255], as the study's utils/prepare_sliver07.py (no window, no
resize: 512x512).

Where fidmed differs from the study's script:
  a slice whose range max - min exceeds 32767: the study subtracts in int16, which wraps around there and gives
    values outside [0, 255]; fidmed computes in float64 (identical to the study's values up to a range of 32767)
    and writes the true min-max. Typical CT slices are far below that range.
  a constant slice: the study's formula divides 0 by 0; see --constant.""",
        example="--src SLIVER07/scan/ --out data/ct",
        version="ct-1",
        study_script="utils/prepare_sliver07.py",
    ),
)
@dataclass(frozen=True)
class CTPreparer(Preparer):
    """SLIVER07 MetaImage volumes to per-slice min-max rescaled 8-bit slices (see the module docstring)."""

    pattern: str = "*.mhd"
    constant: Literal["skip", "zero"] = "skip"
    resolution: int | None = None
    quantize: Quantize = "round"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pattern", default="*.mhd", help="file-name pattern of the volumes (default *.mhd)")
        parser.add_argument(
            "--constant",
            choices=("skip", "zero"),
            default="skip",
            help="constant slices (min = max), where the study's formula divides 0 by 0: skip and "
            "list (default) or write black",
        )
        parser.add_argument(
            "--resolution", type=positive_int, default=None, help="resize to N x N (default: native size, as the study)"
        )
        add_quantize_argument(parser)

    def steps(self) -> list[str]:
        steps = [
            f"read every file matching {self.pattern!r} in --src (recursively, sorted) with SimpleITK "
            f"MetaImageIO; refuse volumes that are not 3-D or hold NaN/inf",
            "every slice i along the third (axial) axis, as the array [y, x]; output <name>_<i>.png",
            "per-slice (x - min) * 255.0 / (max - min) (float64 for integer volumes)",
            f"constant slices (min = max): {self.constant}",
        ]
        if self.resolution is not None:
            steps.append(f"resize to {self.resolution}x{self.resolution} (PIL bicubic on float32)")
        steps.append(f"{self.quantize} to uint8")
        return steps

    def discover(self, src: Path) -> Discovery:
        files = [rel for rel in list_files(src) if fnmatch.fnmatch(Path(rel).name.lower(), self.pattern.lower())]
        if not files:
            raise DataError(
                f"no files matching {self.pattern!r} under {src}; point --src at the SLIVER07 scans "
                f"(liver-orig*.mhd with their .raw files)."
            )
        require_unique_stems(src, files, (".mhd", ".mha"))
        return Discovery([Source(rel, (rel, *_metaimage_data_files(src, rel))) for rel in files])

    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        path = src / source.files[0]
        image = read_volume(path, "MetaImageIO")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise BadSource(
                f"{path} is a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()}"
                f" component(s) per voxel; expected a 3-D grey-value CT volume."
            )
        volume = finite_array(image, path)  # [z, y, x]
        prefix = strip_suffix(Path(source.files[0]).name, (".mhd", ".mha"))
        for i, slab in enumerate(volume):
            emit.count("slices")
            if slab.min() == slab.max():
                if self.constant == "skip":
                    emit.skip(
                        f"slice {i}",
                        f"constant slice (all {slab.min()}): the study's min-max rescale is undefined (0/0)",
                        "skipped_constant",
                    )
                    continue
                values = np.zeros(slab.shape, dtype=np.float64)
            else:
                values = minmax_to_255(slab)
            if self.resolution is not None:
                values = resize_float(values, self.resolution)
            emit.image(f"{prefix}_{i}.png", to_uint8(values, self.quantize))
