"""MSD Task01 brain tumour: the 4 MR sequences of every 4-D NIfTI as 256x256 axial slices, keeping a slice only
when more than 15% of its pixels are non-zero (the study's utils/prepare_MSDbt.py).

The study's script, for every file ``<name>.nii.gz`` and every sequence ``s`` in 0..3 (FLAIR, T1w, T1gd, T2w):

1. ``vol = RescaleIntensity(img4d[:, :, :, s])``: SimpleITK min-max rescale of the whole 3-D sequence to
   [0, 255], computed in double and cast back to the volume's pixel type (float for the MSD files; an integer
   volume is truncated to integers);
2. every slice ``i`` along the third axis, as the array [y, x], zero-padded to 256x256 with the study's split
   (even padding halves; odd ``p``: ``p//2 - 1`` before, ``p//2 + 1`` after, on rows and columns alike, which is
   one pixel short: fidmed pads that one at the end, see :func:`pad_msd` and below; MSD's 240x240 slices pad
   evenly);
3. kept when ``(x > 0).sum() / (x > -1).sum() > 0.15`` on the padded float slice, written as
   ``<name>_<s>_<i>``.

**Odd padding and the 15% filter.** The ratio divides by the padded slice's area. Where the padding of an axis is
odd (``pad_to`` minus the slice size odd, e.g. 239 pixels padded to 256), the study's padded slice is one row or
column short of the target and its ratio divides by that smaller area (255 x 256 or 255 x 255 at 256); fidmed's
slice has the full ``pad_to x pad_to`` area, the added row/column being zeros. The numerator is the same, so
fidmed's ratio is the study's times ``area_study / pad_to**2``: a slice whose study ratio lies just above the
threshold, in (0.15, 0.15 * 256/255] = (0.15, 0.15059] with one odd axis or (0.15, 0.15 * 256**2/255**2] =
(0.15, 0.15118] with two, is kept by the study and dropped by fidmed; every other slice gets the same decision.
With MSD's 240x240 slices and the default 256 both paddings are even (16) and the selections are identical.

**Script versus README.** The study's README (and the script's docstring) say the slices are rescaled
*slice-wise*; the script rescales each *volume*. fidmed follows the script (``rescale="volume"``, the default)
and offers the README's reading as ``rescale="slice"`` (SimpleITK RescaleIntensity of each 2-D slice before
padding; a constant slice becomes all zeros and is then dropped by the 15% rule).

Extras: ``sequences`` selects sequences (default all four); ``--src`` is ``imagesTr`` (and/or ``imagesTs``),
hidden ``._*`` files of the archive are ignored; files that are not 4-D with enough sequences, or cannot be read
(truncated: checked separately, since SimpleITK reads a truncated .nii.gz without an error) are skipped (listed)
or stop the run with ``strict``. A slice larger than ``pad_to`` is refused. NaN/infinite voxels: SimpleITK's NIfTI
reader (nifticlib) silently sets them to 0, so the study's scripts saw zeros; fidmed does the same and lists the
file (``nan="zero"``), or refuses it (``nan="skip"``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fidmed.data.prepare.cli import add_nan_argument, add_quantize_argument, fraction, int_list, positive_int
from fidmed.data.prepare.ct import read_volume
from fidmed.data.prepare.output import Emitter
from fidmed.data.prepare.pixels import Quantize, study_pad_split, to_uint8
from fidmed.data.prepare.preparer import PREPARERS, BadSource, Preparer, PreparerInfo, require_medical
from fidmed.data.prepare.sources import Discovery, Source, list_files, require_unique_stems, strip_suffix
from fidmed.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MSD_SEQUENCES = ("FLAIR", "T1w", "T1gd", "T2w")


def pad_msd(slab: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a 2-D slice to ``size x size`` with the study's split (rows: top/bottom, columns: left/right).

    The study's odd split adds up to one pixel less than asked (see :func:`study_pad_split`), which would make
    the slice ``size - 1`` wide; fidmed adds that missing row/column at the end (bottom/right) so that every
    slice is ``size x size`` (a padding of 1, where the study's script crashes, becomes (0, 1)). The added zeros
    enlarge the area the 15% filter divides by, which changes the decision for slices just above the threshold
    (see the module docstring). MSD's slices are 240x240 (even padding), where this never applies.
    """
    rows, cols = slab.shape
    widths = []
    for pad in (size - rows, size - cols):
        before = max(study_pad_split(pad)[0], 0)
        widths.append((before, pad - before))
    return np.pad(slab, widths)


def nonzero_ratio(slab: np.ndarray) -> float:
    """The study's filter statistic: ``(x > 0).sum() / (x > -1).sum()``."""
    return float((slab > 0).sum() / (slab > -1).sum())


def inspect_nifti(path: Path) -> int:
    """Check a NIfTI file before SimpleITK reads it; return its number of NaN/infinite voxels.

    SimpleITK (nifticlib) reads a truncated ``.nii.gz`` without an error (the missing voxels become 0) and sets
    NaN/infinite voxels to 0. So: float files are read once with nibabel (which fails on truncated data) to
    count non-finite voxels; integer files are checked by size (``.nii``: the file; ``.nii.gz``: gzip's
    ISIZE trailer, with a full decompression when it does not match, e.g. for multi-member files).
    """
    import gzip
    import zlib

    nib = require_medical("nibabel")
    try:
        image = nib.load(str(path))
        dtype = image.get_data_dtype()
        expected = int(image.header.get_data_offset()) + int(np.prod(image.shape)) * dtype.itemsize
        if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
            data = np.asanyarray(image.dataobj)
            return int((~np.isfinite(data)).sum())
        if str(path).lower().endswith(".gz"):
            with open(path, "rb") as handle:
                handle.seek(-4, 2)
                isize = int.from_bytes(handle.read(4), "little")
            if isize != expected % (1 << 32):
                total = 0
                with gzip.open(path, "rb") as handle:
                    while chunk := handle.read(1 << 24):
                        total += len(chunk)
                if total < expected:
                    raise BadSource(f"{path} is truncated ({total} of {expected} bytes after decompression)")
        elif path.stat().st_size < expected:
            raise BadSource(f"{path} is truncated ({path.stat().st_size} of {expected} bytes)")
    except BadSource:
        raise
    except EOFError as exc:
        raise BadSource(f"{path} is truncated ({exc})") from exc
    except (OSError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise BadSource(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    return 0


def read_nifti_like_the_study(path: Path, nan: str, emit: Emitter) -> object:
    """SimpleITK image of a checked NIfTI (see :func:`inspect_nifti`). NaN/infinite voxels: ``nan="zero"``
    keeps SimpleITK's zeros (what the study's scripts got) and lists the file; ``"skip"`` refuses it."""
    bad = inspect_nifti(path)
    if bad:
        if nan != "zero":
            raise BadSource(
                f"{path} holds {bad} NaN/infinite voxel(s); fix or remove the file (or use --nan zero "
                f"to read them as 0, as the study's SimpleITK reading did)."
            )
        emit.skip(
            "file",
            f"{path} holds {bad} NaN/infinite voxel(s), read as 0 (SimpleITK's NIfTI reader, as in the study)",
            "nan_files",
        )
    return read_volume(path)


def read_4d_like_the_study(path: Path, nan: str, emit: Emitter, picks, expected: str, what: str, option: str) -> object:
    """A single-component 4-D volume (:func:`read_nifti_like_the_study`) whose 4th axis holds every index in
    ``picks``; anything else is a :class:`BadSource` naming the file. ``expected`` describes the axes for the
    message, ``what`` names the 4th-axis entries (e.g. "time frame"), ``option`` the flag that chooses them."""
    image = read_nifti_like_the_study(path, nan, emit)
    size = image.GetSize()
    if image.GetDimension() != 4:
        raise BadSource(f"{path} is {image.GetDimension()}-D (size {size}); expected {expected}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadSource(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected 1.")
    missing = [k for k in picks if not 0 <= k < size[3]]
    if missing:
        raise BadSource(
            f"{path} has {size[3]} {what}(s){' along its 4th axis' if what == 'sequence' else ''}; "
            f"{what}(s) {missing} were asked for (use {option})."
        )
    return image


def discover_nifti(src: Path, what: str, hint: str) -> list[str]:
    files = list_files(src, NIFTI_SUFFIXES)
    if not files:
        raise DataError(f"no .nii/.nii.gz files under {src}; point --src at {what} ({hint}).")
    require_unique_stems(src, files, NIFTI_SUFFIXES)
    return files


@PREPARERS.register(
    "mri",
    info=PreparerInfo(
        help="MSD brain tumour 4-D NIfTIs -> 4 sequences, volume min-max, pad 256, >15% non-zero "
        "(the study's prepare_MSDbt.py)",
        description="""\
MSD Task01 brain tumour: the 4 MR sequences (FLAIR, T1w, T1gd, T2w) of every 4-D NIfTI under --src (imagesTr),
as the study's utils/prepare_MSDbt.py: SimpleITK min-max rescale of each sequence volume to [0, 255], every axial
slice zero-padded to 256x256, kept when more than 15% of the padded slice's pixels are non-zero.

Where fidmed differs from the study's script:
  the study's README says the slices are rescaled one by one, its script rescales each volume: the script is the
    default, --rescale slice follows the README;
  an odd padding (--pad-to minus the slice size odd, e.g. 239 pixels padded to 256): the study's split pads one
    pixel short, fidmed adds the missing zero row/column, which enters the 15% filter's denominator: slices
    whose study ratio is just above the threshold (0.15 to 0.1506 with one odd axis, to 0.1512 with two, at 256)
    are dropped. MSD's 240x240 slices pad evenly to 256, where both select the same slices.""",
        example="--src Task01_BrainTumour/imagesTr --out data/mri  [--rescale slice]",
        version="mri-1",
        study_script="utils/prepare_MSDbt.py",
    ),
)
@dataclass(frozen=True)
class MRIPreparer(Preparer):
    """MSD brain tumour 4-D NIfTIs to filtered, padded 8-bit slices (see the module docstring)."""

    rescale: Literal["volume", "slice"] = "volume"
    sequences: tuple[int, ...] = (0, 1, 2, 3)
    pad_to: int = 256
    min_nonzero: float = 0.15
    nan: Literal["zero", "skip"] = "zero"
    quantize: Quantize = "round"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--rescale",
            choices=("volume", "slice"),
            default="volume",
            help="min-max per sequence volume (the study's script; default) or per slice (its README)",
        )
        parser.add_argument(
            "--sequences",
            type=int_list,
            default=(0, 1, 2, 3),
            help="sequences to keep, 0=FLAIR 1=T1w 2=T1gd 3=T2w (default 0,1,2,3)",
        )
        parser.add_argument(
            "--pad-to",
            type=positive_int,
            default=256,
            help="zero-pad slices to N x N (default 256). An odd padding (N minus the slice size odd) "
            "is one pixel short in the study's script; fidmed pads that pixel too, "
            "and the 15%% filter then divides by the larger area, so slices just above the "
            "threshold in the study are dropped",
        )
        parser.add_argument(
            "--min-nonzero",
            type=fraction,
            default=0.15,
            help="keep a slice when its share of non-zero pixels, over the padded N x N slice, "
            "exceeds this (default 0.15; see --pad-to for odd paddings)",
        )
        add_nan_argument(parser)
        add_quantize_argument(parser)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequences", tuple(int(s) for s in self.sequences))

    def steps(self) -> list[str]:
        names = ", ".join(f"{s}={MSD_SEQUENCES[s] if s < len(MSD_SEQUENCES) else '?'}" for s in self.sequences)
        rescale = (
            "SimpleITK RescaleIntensity of each 3-D sequence volume to [0, 255] (the study's script)"
            if self.rescale == "volume"
            else "SimpleITK RescaleIntensity of each 2-D slice to [0, 255] (the study's README)"
        )
        return [
            f"read every .nii/.nii.gz under --src with SimpleITK; require 4-D with sequences {names}; "
            "refuse truncated files; NaN/inf voxels: " + ("read as 0 (SimpleITK)" if self.nan == "zero" else "refuse"),
            rescale,
            "every slice i along the third axis, as the array [y, x]",
            f"zero-pad to {self.pad_to}x{self.pad_to} (odd padding p: p//2-1 before, p//2+1 after, plus the "
            f"one missing pixel after)",
            f"keep if (x > 0).sum() / (x > -1).sum() > {self.min_nonzero}; output <name>_<sequence>_<i>.png",
            f"{self.quantize} to uint8",
        ]

    def discover(self, src: Path) -> Discovery:
        files = discover_nifti(src, "the MSD Task01_BrainTumour images", "its imagesTr folder")
        return Discovery([Source(rel, (rel,)) for rel in files])

    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        sitk = require_medical("SimpleITK")
        path = src / source.files[0]
        image = read_4d_like_the_study(
            path,
            self.nan,
            emit,
            self.sequences,
            "a 4-D MSD brain volume (x, y, z, sequence) -- is it a label file?",
            "sequence",
            "--sequences",
        )
        size = image.GetSize()
        if size[0] > self.pad_to or size[1] > self.pad_to:
            raise BadSource(
                f"{path} has {size[0]}x{size[1]} (WxH) slices, larger than the padding target "
                f"{self.pad_to}x{self.pad_to} (use --pad-to)."
            )
        prefix = strip_suffix(Path(source.files[0]).name, NIFTI_SUFFIXES)
        for seq in self.sequences:
            volume = image[:, :, :, seq]
            if self.rescale == "volume":
                slabs = sitk.GetArrayFromImage(sitk.RescaleIntensity(volume))  # [z, y, x]
            else:
                slabs = (sitk.GetArrayFromImage(sitk.RescaleIntensity(volume[:, :, i])) for i in range(size[2]))
            for i, slab in enumerate(slabs):
                emit.count("slices")
                padded = pad_msd(slab, self.pad_to)
                if not nonzero_ratio(padded) > self.min_nonzero:
                    emit.count("filtered_nonzero")
                    continue
                emit.image(f"{prefix}_{seq}_{i}.png", to_uint8(padded, self.quantize))
