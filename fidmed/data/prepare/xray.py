"""NIH ChestX-ray14: every PNG to 1-channel 8-bit grey (the study's utils/prepare_chestxray14.py).

The study opens each file with PIL, converts it with ``convert('L')`` and saves it under the same name; about
1,000 of the 112,120 files have 4 channels (RGBA), which ``convert('L')`` turns into ITU-R 601-2 luma ignoring
alpha. No resizing (the images are 1024x1024). fidmed does the same, reads the archive's ``images*/`` sub-folders
recursively (the output folder is flat, as the study's), and adds:

* 16/32-bit files (PIL modes I;16, I, F), which ``convert('L')`` would clip at 255: refused by default
  (``high_depth="refuse"``: listed as bad), or min-max rescaled to [0, 255] per image (``"rescale"``).
* ``resolution``: optional resize to ``resolution x resolution`` (PIL bicubic on float32, then rounding); the
  study trained at the native size.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fidmed.data.prepare.cli import add_quantize_argument, positive_int
from fidmed.data.prepare.output import Emitter
from fidmed.data.prepare.pixels import Quantize, minmax_to_255, resize_float, to_uint8
from fidmed.data.prepare.preparer import PREPARERS, BadSource, Preparer, PreparerInfo
from fidmed.data.prepare.sources import Discovery, Source, list_files, require_unique_stems, strip_suffix
from fidmed.errors import DataError

XRAY_SUFFIXES = (".png",)
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@PREPARERS.register(
    "xray",
    info=PreparerInfo(
        help="NIH ChestX-ray14 PNGs -> 8-bit grey PNGs (the study's prepare_chestxray14.py)",
        description="""\
NIH ChestX-ray14: every PNG under --src (the images_*/ folders, recursively) to 1-channel 8-bit grey with PIL's
convert('L'), as the study's utils/prepare_chestxray14.py: RGBA files become ITU-R 601-2 luma (alpha ignored),
no resize (1024x1024). 16/32-bit files, which convert('L') would clip at 255, are refused (listed) unless
--high-depth rescale min-max rescales them.""",
        example="--src ChestX-ray14/ --out data/xray",
        version="xray-1",
        study_script="utils/prepare_chestxray14.py",
    ),
)
@dataclass(frozen=True)
class XrayPreparer(Preparer):
    """ChestX-ray14 PNGs to 8-bit grey PNGs (see the module docstring)."""

    high_depth: Literal["refuse", "rescale"] = "refuse"
    resolution: int | None = None
    quantize: Quantize = "round"  # only used by high_depth="rescale" and resolution

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--high-depth",
            choices=("refuse", "rescale"),
            default="refuse",
            help="16/32-bit PNGs: refuse (listed as skipped; default) or min-max rescale to 8 bits",
        )
        parser.add_argument(
            "--resolution", type=positive_int, default=None, help="resize to N x N (default: native size, as the study)"
        )
        add_quantize_argument(parser)

    def steps(self) -> list[str]:
        steps = [
            "read every *.png under --src (recursively, sorted); output name = source file name",
            "PIL Image.convert('L') (RGBA/LA/P/RGB -> ITU-R 601-2 luma, alpha ignored)",
        ]
        if self.high_depth == "rescale":
            steps.append(f"16/32-bit files: per-image min-max rescale to [0, 255] in float64, {self.quantize} to uint8")
        else:
            steps.append("16/32-bit files: refused (listed as skipped)")
        if self.resolution is not None:
            steps.append(
                f"resize to {self.resolution}x{self.resolution} (PIL bicubic on float32), {self.quantize} to uint8"
            )
        return steps

    def discover(self, src: Path) -> Discovery:
        files = list_files(src, XRAY_SUFFIXES)
        if not files:
            raise DataError(
                f"no .png files under {src}; point --src at the extracted ChestX-ray14 images "
                f"(the folder holding images_001/ ... or the PNGs themselves)."
            )
        require_unique_stems(src, files, XRAY_SUFFIXES)
        return Discovery([Source(rel, (rel,)) for rel in files])

    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        import PIL.Image

        path = src / source.files[0]
        try:
            with PIL.Image.open(path) as image:
                image.load()
                mode = image.mode
                if mode in _HIGH_DEPTH_MODES:
                    if self.high_depth != "rescale":
                        raise BadSource(
                            f"{path} is a {mode} (16/32-bit) image, which PIL's convert('L') (the "
                            f"study's step) clips at 255; use --high-depth rescale to min-max rescale "
                            f"it, or remove it."
                        )
                    values = np.asarray(image)
                    if values.min() == values.max():
                        raise BadSource(f"{path} is constant ({values.min()}); it cannot be min-max rescaled.")
                    pixels = minmax_to_255(values)
                else:
                    pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        except BadSource:
            raise
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
            raise BadSource(f"cannot read {path} as an image ({type(exc).__name__}: {exc})") from exc
        if self.resolution is not None:
            pixels = resize_float(np.asarray(pixels, dtype=np.float32), self.resolution)
        emit.image(strip_suffix(Path(source.files[0]).name, XRAY_SUFFIXES) + ".png", to_uint8(pixels, self.quantize))
