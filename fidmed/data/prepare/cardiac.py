"""ACDC cine MRI: time frame 0 of every ``*4d*`` NIfTI, each short-axis slice padded to a square with its minimum,
B-spline resampled to 256x256 and rescaled to [0, 255] (the study's utils/prepare_ACDC.py).

The study's script, for every ``patient*/<name>.nii.gz`` whose name contains ``4d``, frame ``t = 0`` and every
slice ``j`` along the third axis (all with SimpleITK):

1. ``Cast(img4d[:, :, :, t][:, :, j], Float32)``;
2. pad "to a square" with ``ConstantPadImageFilter`` and the slice minimum: with ``p = max(h, w) - size`` split
   as ``(p//2 - 1, p//2 + 1)`` when odd, the lower x bound takes the first part and the lower y bound the
   *second* (the script passes ``[l_pad, b_pad]`` / ``[r_pad, t_pad]``), so in the array [y, x] the larger part
   of an odd row padding goes to the top and of an odd column padding to the right. An odd split adds up to
   ``p - 1``, so such a slice stays one pixel short of square; step 3 stretches it to 256x256 all the same
   (fidmed reproduces this; a padding of 1, where the script crashes, becomes (0, 1));
3. ``ResampleImageFilter`` to 256x256: output spacing ``size * spacing / 256``, the input's origin and direction,
   identity transform, cubic B-spline interpolation, default value ``img.GetPixelIDValue()`` (8 for float32: the
   script's, used only where a sample falls outside the image, i.e. where a padded side is at most 128 pixels);
4. ``RescaleIntensity(., 0, 255)`` (float32), written as ``<name>_<t>_<j>``.

fidmed reproduces these calls and writes ``<name>_<t>_<j>.png`` rounded to uint8. ``frames`` selects other
frames, ``size`` another resampling target. Files that are not 4-D or cannot be read (truncated included) are
skipped (listed) or stop the run with ``strict``; NaN voxels are read as 0 as SimpleITK does (listed), or refused
with ``nan="skip"`` (see :func:`fidmed.data.prepare.mri.inspect_nifti`).

**Constant slices** (min = max, value ``c``) are not converted: fidmed skips and lists them (``constant="skip"``,
the default) or writes an all-black image (``constant="zero"``). What the study's script writes for one depends
on the slice's size. Padding with the minimum keeps it constant, and inside the image the B-spline reproduces
``c``; RescaleIntensity of a constant image gives 0, so a slice whose padded sides both exceed 128 pixels comes
out black, as with ``constant="zero"``. A slice with a padded side of at most 128 pixels (``size / 2`` for
another ``size``) also has output samples outside the image, the last rows (bottom) and/or columns (right), about
``128 / side`` of them, which take the resampler's default value 8 (step 3). The rescale then maps ``c`` and 8 to
the ends of [0, 255]: for ``c > 8`` a white image with a black border, for ``c < 8`` a black image with a white
border, and black only for ``c = 8``. fidmed writes neither border image: it skips such a slice, or with
``constant="zero"`` writes it all black.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fidmed.data.prepare.cli import add_nan_argument, add_quantize_argument, int_list, positive_int
from fidmed.data.prepare.mri import NIFTI_SUFFIXES, read_4d_like_the_study
from fidmed.data.prepare.output import Emitter
from fidmed.data.prepare.pixels import Quantize, study_pad_split, to_uint8
from fidmed.data.prepare.preparer import PREPARERS, Preparer, PreparerInfo, require_medical
from fidmed.data.prepare.sources import Discovery, Source, list_files, require_unique_stems, strip_suffix
from fidmed.errors import DataError


def pad_square_acdc(slice2d: object) -> object:
    """Step 2: pad a float32 2-D SimpleITK image to a square with its minimum, as the study's ``pad_image``."""
    sitk = require_medical("SimpleITK")
    data = sitk.GetArrayViewFromImage(slice2d)
    h, w = data.shape
    res = max(h, w)
    l_pad, r_pad = (max(v, 0) for v in study_pad_split(res - w))  # a padding of 1: (0, 1); the script crashes
    t_pad, b_pad = (max(v, 0) for v in study_pad_split(res - h))
    pad = sitk.ConstantPadImageFilter()
    pad.SetPadLowerBound([l_pad, b_pad])
    pad.SetPadUpperBound([r_pad, t_pad])
    pad.SetConstant(float(data.min()))
    return pad.Execute(slice2d)


def resample_acdc(image: object, size: int) -> object:
    """Step 3: B-spline resample a 2-D SimpleITK image to ``size x size`` over the same physical extent."""
    sitk = require_medical("SimpleITK")
    new_size = [size, size]
    spacing = [old * sp / new for old, sp, new in zip(image.GetSize(), image.GetSpacing(), new_size)]
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(new_size)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetTransform(sitk.Transform())
    resampler.SetDefaultPixelValue(image.GetPixelIDValue())  # the study's value (see the module docstring)
    resampler.SetInterpolator(sitk.sitkBSpline)
    return resampler.Execute(image)


@PREPARERS.register(
    "cardiac",
    info=PreparerInfo(
        help="ACDC 4-D NIfTIs -> frame 0, pad square, B-spline 256, min-max (the study's prepare_ACDC.py)",
        description="""\
ACDC cine MRI: time frame 0 of every patient*/*4d*.nii.gz under --src, each short-axis slice padded to a square
with its minimum, B-spline resampled to 256x256 and rescaled to [0, 255], as the study's utils/prepare_ACDC.py
(including its one-pixel-short odd padding, and its resampler's default value 8 where a padded slice with a
side of at most 128 pixels has output samples outside the image).

Where fidmed differs from the study's script:
  constant slices are skipped and listed, or written black with --constant zero. The study wrote black only when
    both padded sides exceed 128 pixels (half of 256); with a side of at most 128 (slices up to 128 pixels wide,
    or 129 with an odd padding) it wrote a white image with a black bottom/right border (constant above 8) or a
    black image with a white border (below 8), from the resampler's default value 8.""",
        example="--src ACDC/database/ --out data/cardiac",
        version="cardiac-1",
        study_script="utils/prepare_ACDC.py",
    ),
)
@dataclass(frozen=True)
class CardiacPreparer(Preparer):
    """ACDC 4-D cine NIfTIs to square, resampled 8-bit slices (see the module docstring)."""

    frames: tuple[int, ...] = (0,)
    size: int = 256
    constant: Literal["skip", "zero"] = "skip"
    nan: Literal["zero", "skip"] = "zero"
    quantize: Quantize = "round"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--frames", type=int_list, default=(0,), help="time frames to keep (default 0)")
        parser.add_argument("--size", type=positive_int, default=256, help="B-spline resample to N x N (default 256)")
        parser.add_argument(
            "--constant",
            choices=("skip", "zero"),
            default="skip",
            help="constant slices: skip and list (default) or write black. Black is the study's "
            "output only when both padded sides exceed 128 pixels; for smaller slices its "
            "resampler's default value 8 gave a white image with a black border (or the "
            "reverse)",
        )
        add_nan_argument(parser)
        add_quantize_argument(parser)

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(int(f) for f in self.frames))

    def steps(self) -> list[str]:
        return [
            "every .nii/.nii.gz whose name contains '4d' in a folder whose name contains 'patient' under --src "
            "(recursively), read with SimpleITK; require 4-D; refuse truncated files; NaN/inf voxels: "
            + ("read as 0 (SimpleITK)" if self.nan == "zero" else "refuse"),
            f"time frame(s) {list(self.frames)}; every slice j along the third axis",
            "Cast to float32",
            "pad to a square with the slice minimum (ConstantPadImageFilter; odd padding p: p//2-1 at the low x "
            "and high y index, p//2+1 at the high x and low y index: one pixel short of square, as the study)",
            f"resample to {self.size}x{self.size}: spacing size*spacing/{self.size}, same origin and direction, "
            "identity transform, sitkBSpline, default value = pixel ID value",
            "RescaleIntensity to [0, 255] (float32)",
            f"constant slices (min = max): {self.constant}",
            f"{self.quantize} to uint8; output <name>_<frame>_<j>.png",
        ]

    def discover(self, src: Path) -> Discovery:
        files = [
            rel
            for rel in list_files(src, NIFTI_SUFFIXES)
            if "patient" in Path(rel).parent.name and "4d" in strip_suffix(Path(rel).name, NIFTI_SUFFIXES)
        ]
        if not files:
            raise DataError(
                f"no patient*/*4d*.nii.gz files under {src}; point --src at the ACDC database folder "
                f"(the one holding the patientXXX folders, or its training/ and testing/ parents)."
            )
        require_unique_stems(src, files, NIFTI_SUFFIXES)
        return Discovery([Source(rel, (rel,)) for rel in files])

    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        sitk = require_medical("SimpleITK")
        path = src / source.files[0]
        image = read_4d_like_the_study(
            path, self.nan, emit, self.frames, "a 4-D cine volume (x, y, slice, time).", "time frame", "--frames"
        )
        size = image.GetSize()
        prefix = strip_suffix(Path(source.files[0]).name, NIFTI_SUFFIXES)
        for t in self.frames:
            volume = image[:, :, :, t]
            for j in range(size[2]):
                emit.count("slices")
                slice2d = sitk.Cast(volume[:, :, j], sitk.sitkFloat32)
                values = sitk.GetArrayViewFromImage(slice2d)
                if values.min() == values.max():
                    if self.constant == "skip":
                        emit.skip(f"frame {t} slice {j}", f"constant slice (all {values.min()})", "skipped_constant")
                        continue
                    emit.image(f"{prefix}_{t}_{j}.png", np.zeros((self.size, self.size), dtype=np.uint8))
                    continue
                square = pad_square_acdc(slice2d)
                resampled = resample_acdc(square, self.size)
                rescaled = sitk.RescaleIntensity(resampled, 0.0, 255.0)
                emit.image(f"{prefix}_{t}_{j}.png", to_uint8(sitk.GetArrayFromImage(rescaled), self.quantize))
