"""Pixel helpers of the preparers: rescaling to [0, 255], quantisation to uint8, the study's padding splits,
resizing, and the hash of an image's pixels.

Conventions: a 2-D image is a numpy array indexed ``[row, column]`` exactly as ``SimpleITK.GetArrayFromImage``
returns a slice (row = the image's y index), which is how the study's training code (its stylegan2-ada-pytorch
fork reads NIfTI slices with SimpleITK) saw its images. The study's scripts wrote float NIfTI slices in [0, 255];
fidmed writes 8-bit PNGs, rounding to the nearest integer by default (``quantize="round"``; ``"floor"`` truncates
instead). How the study made 8-bit files from its NIfTI slices for the FD tools is not in its code
(unconfirmed), hence the option.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from fidmed.data.prepare.preparer import BadSource

Quantize = Literal["round", "floor"]


def to_uint8(values: np.ndarray, quantize: Quantize = "round") -> np.ndarray:
    """Values in [0, 255] (any float or integer dtype) to uint8: clip to [0, 255], then round to nearest
    (``np.rint``, ties to even) or truncate (``floor``)."""
    if values.dtype == np.uint8:
        return values
    work = np.clip(np.asarray(values, dtype=np.float64), 0.0, 255.0)
    work = np.rint(work) if quantize == "round" else np.floor(work)
    return work.astype(np.uint8)


def minmax_to_255(values: np.ndarray) -> np.ndarray:
    """``(x - min) * 255.0 / (max - min)``: the study's ``convert_range(x, x.min(), x.max(), 0, 255)``
    (utils/prepare_sliver07.py) with exact arithmetic. The caller must have excluded min == max.

    Integer input is computed in float64, float input in its own precision (as numpy computes the study's
    expression for a float array). For the study's int16 CT volumes this equals the study's result, bit for bit,
    only while the slice's range ``max - min`` fits int16 (at most 32767; typical CT slices, about -3024 to a
    few thousand HU, stay far below): the study subtracts in int16 (``x - x.min()`` and ``x.max() - x.min()`` on
    the int16 array SimpleITK returns), and beyond 32767 both differences wrap around modulo 65536, so its script
    writes values outside [0, 255] for such a slice (negative for the pixels below ``min + 32768``, above 255 for
    some of the others). fidmed computes the true min-max there, in [0, 255], and does not reproduce the
    wrap-around. Unsigned and wider integer types never wrap in the study's formula.
    """
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
        raise BadSource(
            f"image of {values.shape[1]}x{values.shape[0]} (WxH) is not square and cannot be resized to {size}x{size}"
        )
    if values.shape == (size, size):
        return values
    image = PIL.Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))  # mode F
    return np.asarray(image.resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float32)


def pixels_sha256(pixels: np.ndarray) -> str:
    """sha256 of a uint8 image's shape and bytes (independent of the PNG encoder)."""
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode("ascii"))
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()
