"""Image preprocessing shared by extractors: 8-bit images -> float32 [N, 3, S, S] in [0, 255].

A ``Preprocessing`` names everything between the 8-bit image and the extractor's own normalisation (which each
extractor does inside its forward pass). Extractors with equal ``Preprocessing`` share one computation per batch.

Resizers
- ``clean`` (the study): PIL bicubic on float32, one channel at a time, no re-quantisation and no clipping, as
  the study's StudioGAN fork (src/utils/resize.py, ``make_resizer("PIL", "bicubic", ...)``). Bicubic overshoot
  below 0 or above 255 is kept.
- ``clean_clip`` (clean-fid's "clean" mode, ``make_resizer("PIL", False, "bicubic", ...)``): the same, then
  clipped to [0, 255].
- ``nearest``: PIL nearest-neighbour on the 8-bit channels (Keras' image loader with its default
  interpolation="nearest"); values stay integers.
- ``pil_bicubic`` (dgm-eval's default, ``clean_resize=False``): torchvision ``Resize((S, S), BICUBIC)`` on the 8-bit
  RGB PIL image, i.e. PIL's own 8-bit bicubic (antialiased, rounded and clipped to integers by PIL); values stay
  integers, ``ToTensor`` then divides by 255 inside the extractor.
- ``torch_bilinear`` (pytorch-fid's resize, for comparison with numbers published with ``python -m pytorch_fid``):
  ``F.interpolate(x / 255, (S, S), mode="bilinear", align_corners=False)`` on the float32 [0, 1] image (no
  antialiasing), returned times 255. The extractor's own ``/ 255`` then gives pytorch-fid's network input to
  within one float32 ulp (measured: ~0.4% of the values differ by one ulp, the rest are equal); at the target
  size the image is passed through unchanged, as in pytorch-fid, where that interpolation is the identity.
Gray images (C = 1) are copied to 3 channels, as the study's loaders did (PIL ``convert("RGB")``); a gray channel
(or an RGB image whose three channels are equal) is resized once and copied, which gives the identical result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fidmed.errors import ConfigError, FidmedError

RESIZERS = ("clean", "clean_clip", "nearest", "pil_bicubic", "torch_bilinear")
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """What an extractor needs from an 8-bit image: resizer, square output size and channel order."""

    resizer: str = "clean"
    size: int = 299
    channels: str = "RGB"

    def __post_init__(self) -> None:
        if self.resizer not in RESIZERS:
            raise ConfigError(f"unknown resizer {self.resizer!r}; choose one of {', '.join(RESIZERS)}")
        if self.channels not in CHANNEL_ORDERS:
            raise ConfigError(f"unknown channel order {self.channels!r}; choose one of {', '.join(CHANNEL_ORDERS)}")
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"input size must be a positive integer, got {self.size!r}")

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``clean-299-RGB`` (used in cache keys and logs)."""
        return f"{self.resizer}-{int(self.size)}-{self.channels}"


def _resize_channel(ch: np.ndarray, size: int, resizer: str) -> np.ndarray:
    """Resize one [H, W] channel to [size, size] float32."""
    if resizer == "torch_bilinear":  # pytorch-fid: on the [0, 1] scale, returned on [0, 255]
        x = torch.from_numpy(np.ascontiguousarray(ch)).to(torch.float32)[None, None] / 255
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (y[0, 0] * 255).numpy()
    if resizer in ("nearest", "pil_bicubic"):
        img = Image.fromarray(np.ascontiguousarray(ch, dtype=np.uint8))  # mode "L"
        resample = Image.NEAREST if resizer == "nearest" else Image.BICUBIC
        return np.asarray(img.resize((size, size), resample), dtype=np.float32)
    img = Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32))  # mode "F" (32-bit float)
    out = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32)
    if resizer == "clean_clip":
        out = out.clip(0.0, 255.0)
    return out


def preprocess(batch_uint8: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> float32 ``[N, 3, S, S]`` in [0, 255] (on the input's device)."""
    if not isinstance(batch_uint8, torch.Tensor) or batch_uint8.dtype != torch.uint8:
        got = batch_uint8.dtype if isinstance(batch_uint8, torch.Tensor) else type(batch_uint8).__name__
        raise FidmedError(
            f"preprocess expects uint8 images, got {got}: quantise images to 8 bits first (as a saved PNG would be)"
        )
    if batch_uint8.ndim != 4 or batch_uint8.shape[1] not in (1, 3):
        raise FidmedError(
            f"preprocess expects images [N, C, H, W] with C = 1 (gray) or 3 (RGB), got {tuple(batch_uint8.shape)}; "
            "convert RGBA or other modes to RGB or L first"
        )
    device = batch_uint8.device
    x = batch_uint8.detach().cpu().numpy()
    n, c, h, w = x.shape
    s = int(spec.size)
    out = np.empty((n, 3, s, s), dtype=np.float32)
    for i in range(n):
        img = x[i]
        gray = c == 1 or (np.array_equal(img[0], img[1]) and np.array_equal(img[1], img[2]))
        if (h, w) == (s, s):
            # PIL's resize to the same size returns an exact copy (no resampling), so skip it
            out[i] = img.astype(np.float32) if c == 3 else img[0].astype(np.float32)
        elif gray:
            out[i] = _resize_channel(img[0], s, spec.resizer)
        elif spec.resizer == "pil_bicubic":  # one call on the RGB image, as torchvision's Resize does
            rgb = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))  # mode "RGB"
            out[i] = np.asarray(rgb.resize((s, s), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
        else:
            for k in range(3):
                out[i, k] = _resize_channel(img[k], s, spec.resizer)
    if spec.channels == "BGR":
        out = out[:, ::-1].copy()
    return torch.from_numpy(out).to(device)
