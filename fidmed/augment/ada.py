"""Adaptive discriminator augmentation (ADA; Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data"): a re-implementation of stylegan2-ada-pytorch's ``AugmentPipe`` (``training/augment.py``).

What is the same as the reference (checked against it numerically with equal seeds, see tests/test_augment.py):

- the 15 transforms, their order, parameter names, distributions and default ranges/standard deviations;
- the probability semantics: transform ``t`` is applied to each image independently with probability
  ``p * t`` (its multiplier); arbitrary rotation is split into a pre- and a post-rotation each applied with
  ``1 - sqrt(1 - rotate * p)`` so that "pre or post" has probability ``rotate * p``; each filter band with
  ``p * imgfilter * band``;
- the order of random draws, so that equal seeds give equal augmentations on the CPU;
- non-leaking geometry: all blit and geometric transforms are composed into one inverse homogeneous matrix
  per image and executed once: reflect padding (as much as the transformed corners need), 2x upsampling with
  the sym6 wavelet low-pass filter, bilinear ``grid_sample`` (zeros outside, align_corners=False), 2x
  downsampling with the same filter, crop. (Because sym6 is not symmetric, mirrored results -- x-flip, odd
  quarter turns -- come out slightly blurred rather than exact mirror images; the reference does the same.)
- colour: one 4x4 homogeneous colour matrix per image (brightness, contrast, luma flip, hue rotation,
  saturation); for 1-channel images the matrix is averaged over its three colour rows, so brightness adds b,
  contrast multiplies by c and luma flip negates the value, while hue and saturation are skipped (no draws);
- image-space filtering with the 4-band sym2 filter bank and 1/f expected-power normalisation, reflect
  padded; additive Gaussian noise with ``|N(0, noise_std)|`` sigma per image; cutout of a
  ``cutout_size``-relative rectangle centred uniformly in the image.

What differs, on purpose:

- differentiable to any order on every device and supported PyTorch version: ``grid_sample`` runs through
  :func:`grid_sample`, whose backward is again a ``grid_sample`` (the reference's ``grid_sample_gradfix`` only
  works on torch 1.7-1.9, and the native op's double backward is missing in older releases (seen failing on
  2.11; docs/study.md#reference-implementation-pitfalls), which breaks R1; torch 2.14's native double backward
  works on the CPU, but fidmed supports torch >= 2.4); upfirdn2d is written with strided / transposed ``conv2d``
  (same result as the reference's implementation);
- ``p == 0`` returns the input itself (the reference still runs the near-identity resampling and changes the
  images by float rounding);
- images smaller than the image filter's 21-pixel reflect padding (< 22 px) work: the mirror extension continues
  periodically (the reference raises an error there);
- the ADA module computes in float32 even inside an autocast region.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fidmed.augment.base import AUGMENTATIONS
from fidmed.augment.controller import (
    DEFAULT_INTERVAL,
    DEFAULT_SPEED_KIMG,
    DEFAULT_TARGET,
    AdaptiveAugmentation,
    AdaptiveConfig,
)
from fidmed.errors import ConfigError, DataError

# Low-pass decomposition filters of two Daubechies symlets, digit for digit as tabulated in stylegan2-ada-pytorch
# (training/augment.py, ``wavelets``), so that augmented images match the reference's.
SYM2 = (-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025)
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)

# Probability multipliers of each named pipeline (stylegan2-ada-pytorch train.py ``augpipe_specs``).
_BLIT = ("xflip", "rotate90", "xint")
_GEOM = ("scale", "rotate", "aniso", "xfrac")
_COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
MULTIPLIERS = _BLIT + _GEOM + _COLOR + ("imgfilter", "noise", "cutout")
PIPELINES: dict[str, tuple[str, ...]] = {
    "blit": _BLIT,
    "geom": _GEOM,
    "color": _COLOR,
    "filter": ("imgfilter",),
    "noise": ("noise",),
    "cutout": ("cutout",),
    "bg": _BLIT + _GEOM,
    "bgc": _BLIT + _GEOM + _COLOR,
    "bgcf": _BLIT + _GEOM + _COLOR + ("imgfilter",),
    "bgcfn": _BLIT + _GEOM + _COLOR + ("imgfilter", "noise"),
    "bgcfnc": _BLIT + _GEOM + _COLOR + ("imgfilter", "noise", "cutout"),
}
DEFAULT_PIPELINE = "bgcfnc"


def pipeline_multipliers(pipeline: str) -> dict[str, float]:
    """Multipliers (1 for each enabled transform) of a named pipeline, or a ConfigError listing the names."""
    if pipeline not in PIPELINES:
        raise ConfigError(
            f"unknown ADA pipeline {pipeline!r}; choose one of: {', '.join(PIPELINES)} "
            f"(e.g. augmentation.pipeline=bgcfnc)"
        )
    return {name: 1.0 for name in PIPELINES[pipeline]}


# ---------------------------------------------------------------------------------------------------------------
# Resampling with arbitrary-order gradients.


class _GridSample(torch.autograd.Function):
    """``grid_sample`` (bilinear, zeros, align_corners=False) as a linear map of the images for a fixed grid.

    Its backward is the adjoint map (``grid_sampler_2d_backward`` for the input), and the adjoint's backward is
    this map again, so gradients of any order exist, on any device. No gradient flows to the grid.
    """

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(images, grid)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        images, grid = ctx.saved_tensors
        grad_images = None
        if ctx.needs_input_grad[0]:
            grad_images = _GridSampleAdjoint.apply(grad_out, images, grid)
        return grad_images, None


class _GridSampleAdjoint(torch.autograd.Function):
    """The transpose of :class:`_GridSample` applied to ``grad_out`` (``images`` only supplies shape/dtype)."""

    @staticmethod
    def forward(ctx: Any, grad_out: torch.Tensor, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grid)
        # interpolation 0 = bilinear, padding 0 = zeros; output_mask: the input gradient only.
        grad_images, _ = torch.ops.aten.grid_sampler_2d_backward(grad_out, images, grid, 0, 0, False, [True, False])
        return grad_images

    @staticmethod
    def backward(ctx: Any, grad_grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grid,) = ctx.saved_tensors
        out = _GridSample.apply(grad_grad, grid) if ctx.needs_input_grad[0] else None
        return out, None, None


def grid_sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear ``grid_sample`` (zeros padding, align_corners=False) with gradients of any order for the images.

    A grid that requires gradients falls back to ``torch.nn.functional.grid_sample`` (whose double backward
    is not available on every PyTorch version).
    """
    if grid.requires_grad:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _GridSample.apply(images, grid)


def upsample2x(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """2x upsampling with a separable FIR filter, like stylegan2-ada-pytorch's ``upsample2d(x, f, up=2)``.

    Equivalent to inserting a zero after every pixel, zero-padding by ``(L+1)//2`` before and ``(L-2)//2``
    after (L = filter length), convolving (true convolution) with ``2 * taps`` along each axis; written as a
    transposed convolution, which skips the multiplications by the inserted zeros.
    """
    b, c, h, w = images.shape
    length = taps.numel()
    before = (length + 1) // 2
    k = (taps * 2).to(images.dtype)
    x = images.reshape(b * c, 1, h, w)
    x = F.conv_transpose2d(x, k.view(1, 1, 1, -1), stride=(1, 2), padding=(0, length - 1 - before))
    x = F.conv_transpose2d(x, k.view(1, 1, -1, 1), stride=(2, 1), padding=(length - 1 - before, 0))
    return x.reshape(b, c, 2 * h, 2 * w)


def downsample2x(images: torch.Tensor, taps: torch.Tensor, crop: int) -> torch.Tensor:
    """2x downsampling like ``downsample2d(x, f, down=2, padding=-crop, flip_filter=True)``.

    With an even filter length L this crops ``crop - (L-2)//2`` pixels from each side, correlates with
    ``taps`` along each axis and keeps every second sample.
    """
    b, c, h, w = images.shape
    length = taps.numel()
    trim = crop - (length - 2) // 2
    k = taps.to(images.dtype)
    x = images.reshape(b * c, 1, h, w)
    if trim > 0:
        x = x[:, :, trim : h - trim, trim : w - trim]
    elif trim < 0:
        x = F.pad(x, [-trim] * 4)
    x = F.conv2d(x, k.view(1, 1, 1, -1), stride=(1, 2))
    x = F.conv2d(x, k.view(1, 1, -1, 1), stride=(2, 1))
    return x.reshape(b, c, x.shape[2], x.shape[3])


def reflect_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad the last two dimensions by ``pad`` on every side, also when ``pad`` >= the image size.

    Equal to ``F.pad(images, [pad] * 4, mode="reflect")`` when that is defined (pad < size); beyond, the
    mirror extension continues periodically (period ``2 * (size - 1)``), where ``F.pad`` (and the reference,
    whose image filter needs a 21-pixel pad) fails.
    """
    height, width = images.shape[-2:]
    if pad < height and pad < width:
        return F.pad(images, [pad] * 4, mode="reflect")

    def indices(size: int) -> torch.Tensor:
        idx = torch.arange(-pad, size + pad, device=images.device)
        if size == 1:
            return torch.zeros_like(idx)
        period = 2 * (size - 1)
        idx = idx.remainder(period)
        return torch.where(idx >= size, period - idx, idx)

    return images.index_select(-2, indices(height)).index_select(-1, indices(width))


def filter_bank(lowpass: tuple[float, ...] = SYM2, bands: int = 4) -> np.ndarray:
    """The image-space filter bank of ADA: ``bands`` symmetric 1-D filters that sum to a unit impulse.

    Band 0 is the lowest octave, band ``bands-1`` the highest. Built from the low-pass ``H(z)`` and its
    quadrature mirror ``H(-z)``: at each octave the bank is upsampled by 2 (zeros between taps), smoothed by
    ``H(z)H(1/z)/2``, and the new band gets the centred ``H(-z)H(-1/z)/2``.
    """
    lo = np.asarray(lowpass, dtype=np.float64)
    hi = lo * (-1.0) ** np.arange(lo.size)
    lo2 = np.convolve(lo, lo[::-1]) / 2
    hi2 = np.convolve(hi, hi[::-1]) / 2
    bank = np.zeros([bands, 1])
    bank[0, 0] = 1.0
    for band in range(1, bands):
        spread = np.zeros([bands, 2 * bank.shape[1] - 1])
        spread[:, ::2] = bank
        bank = np.stack([np.convolve(row, lo2) for row in spread])
        start = (bank.shape[1] - hi2.size) // 2
        bank[band, start : start + hi2.size] += hi2
    return bank


# ---------------------------------------------------------------------------------------------------------------
# Batched homogeneous matrices (rows act on column vectors [x, y, 1] or [r, g, b, 1]).


def _eye(n: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, device=device).expand(batch, n, n).clone()


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _eye(3, tx.shape[0], tx.device)
    m[:, 0, 2] = tx
    m[:, 1, 2] = ty
    return m


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(3, sx.shape[0], sx.device)
    m[:, 0, 0] = sx
    m[:, 1, 1] = sy
    return m


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    m = _eye(3, theta.shape[0], theta.device)
    cos, sin = torch.cos(theta), torch.sin(theta)
    m[:, 0, 0] = cos
    m[:, 0, 1] = -sin
    m[:, 1, 0] = sin
    m[:, 1, 1] = cos
    return m


def _const2d(sx: float, sy: float, tx: float, ty: float, device: torch.device) -> torch.Tensor:
    """The 3x3 matrix ``[[sx, 0, tx], [0, sy, ty], [0, 0, 1]]``."""
    return torch.tensor([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]], device=device)


def _translate3d(t: torch.Tensor) -> torch.Tensor:
    m = _eye(4, t.shape[0], t.device)
    m[:, :3, 3] = t[:, None]
    return m


def _scale3d(s: torch.Tensor) -> torch.Tensor:
    m = _eye(4, s.shape[0], s.device)
    m[:, 0, 0] = s
    m[:, 1, 1] = s
    m[:, 2, 2] = s
    return m


def _rotate3d(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by ``theta`` about the unit vector ``axis[:3]`` (Rodrigues), homogeneous 4x4."""
    ax, ay, az = axis[0], axis[1], axis[2]
    cos, sin = torch.cos(theta), torch.sin(theta)
    one_c = 1 - cos
    m = _eye(4, theta.shape[0], theta.device)
    m[:, 0, 0] = ax * ax * one_c + cos
    m[:, 0, 1] = ax * ay * one_c - az * sin
    m[:, 0, 2] = ax * az * one_c + ay * sin
    m[:, 1, 0] = ay * ax * one_c + az * sin
    m[:, 1, 1] = ay * ay * one_c + cos
    m[:, 1, 2] = ay * az * one_c - ax * sin
    m[:, 2, 0] = az * ax * one_c - ay * sin
    m[:, 2, 1] = az * ay * one_c + ax * sin
    m[:, 2, 2] = az * az * one_c + cos
    return m


def _gate(values: torch.Tensor, probability: torch.Tensor, identity: float) -> torch.Tensor:
    """Keep each image's drawn ``values`` with ``probability`` (one uniform draw per image), else ``identity``.

    The uniform has the shape of ``values`` with every non-batch dimension of size 1, as in the reference.
    """
    draw = torch.rand([values.shape[0]] + [1] * (values.ndim - 1), device=values.device)
    return torch.where(draw < probability, values, torch.full_like(values, identity))


# ---------------------------------------------------------------------------------------------------------------


class AugmentPipe(torch.nn.Module):
    """The ADA augmentation pipeline: ``pipe(images, p)`` for images ``[N, C, H, W]`` with C = 1 or 3.

    Arguments are those of stylegan2-ada-pytorch's ``AugmentPipe``: a probability multiplier per transform
    (0 = disabled) and the ranges of their parameters (defaults = the reference's).
    """

    def __init__(
        self,
        xflip: float = 0,
        rotate90: float = 0,
        xint: float = 0,
        xint_max: float = 0.125,
        scale: float = 0,
        rotate: float = 0,
        aniso: float = 0,
        xfrac: float = 0,
        scale_std: float = 0.2,
        rotate_max: float = 1,
        aniso_std: float = 0.2,
        xfrac_std: float = 0.125,
        brightness: float = 0,
        contrast: float = 0,
        lumaflip: float = 0,
        hue: float = 0,
        saturation: float = 0,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        hue_max: float = 1,
        saturation_std: float = 1,
        imgfilter: float = 0,
        imgfilter_bands: tuple[float, ...] = (1, 1, 1, 1),
        imgfilter_std: float = 1,
        noise: float = 0,
        cutout: float = 0,
        noise_std: float = 0.1,
        cutout_size: float = 0.5,
    ) -> None:
        super().__init__()
        # Pixel blitting: x-flip, multiples of 90 degrees, integer translation (max relative to image size).
        self.xflip, self.rotate90, self.xint = float(xflip), float(rotate90), float(xint)
        self.xint_max = float(xint_max)
        # General geometry: isotropic scale (log2 std), rotation (1 = full circle), anisotropic scale (log2
        # std), fractional translation (std relative to image size).
        self.scale, self.rotate, self.aniso, self.xfrac = float(scale), float(rotate), float(aniso), float(xfrac)
        self.scale_std, self.rotate_max = float(scale_std), float(rotate_max)
        self.aniso_std, self.xfrac_std = float(aniso_std), float(xfrac_std)
        # Colour: brightness (std of the offset), contrast (log2 std), luma flip, hue rotation (1 = full
        # circle), saturation (log2 std).
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)
        # Image-space filtering: per-band multipliers, log2 std of the band gains.
        self.imgfilter, self.imgfilter_std = float(imgfilter), float(imgfilter_std)
        self.imgfilter_bands = [float(b) for b in imgfilter_bands]
        # Corruptions: additive noise (std of the per-image sigma), cutout (size relative to the image).
        self.noise, self.cutout, self.noise_std, self.cutout_size = (
            float(noise),
            float(cutout),
            float(noise_std),
            float(cutout_size),
        )
        # Constant filters (not part of the state dict: they follow from the code).
        geom = torch.tensor(SYM6, dtype=torch.float32)
        self.register_buffer("geom_taps", geom / geom.sum(), persistent=False)
        self.register_buffer("fbank", torch.as_tensor(filter_bank(SYM2, 4), dtype=torch.float32), persistent=False)
        if len(self.imgfilter_bands) != self.fbank.shape[0]:
            raise ConfigError(f"imgfilter_bands needs {self.fbank.shape[0]} values, got {self.imgfilter_bands}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) > 0 for name in MULTIPLIERS)

    # -- geometry ---------------------------------------------------------------------------------------------

    def _geometry(self, batch: int, height: int, width: int, p: torch.Tensor) -> torch.Tensor | None:
        """The inverse transform per image (output pixel -> input pixel), ``[N, 3, 3]``, or None if disabled."""
        dev = p.device
        g_inv: torch.Tensor | None = None

        def then(m: torch.Tensor) -> None:
            nonlocal g_inv
            g_inv = m if g_inv is None else g_inv @ m

        if self.xflip > 0:
            i = _gate(torch.floor(torch.rand([batch], device=dev) * 2), self.xflip * p, 0)
            then(_scale2d(1 - 2 * i, torch.ones_like(i)))
        if self.rotate90 > 0:
            i = _gate(torch.floor(torch.rand([batch], device=dev) * 4), self.rotate90 * p, 0)
            then(_rotate2d(math.pi / 2 * i))  # the inverse of a rotation by -90 degrees * i
        if self.xint > 0:
            t = _gate((torch.rand([batch, 2], device=dev) * 2 - 1) * self.xint_max, self.xint * p, 0)
            then(_translate2d(-torch.round(t[:, 0] * width), -torch.round(t[:, 1] * height)))
        if self.scale > 0:
            s = _gate(torch.exp2(torch.randn([batch], device=dev) * self.scale_std), self.scale * p, 1)
            then(_scale2d(1 / s, 1 / s))
        # Pre- and post-rotation each with p_rot, so that P(pre or post) = rotate * p.
        p_rot = 1 - torch.sqrt((1 - self.rotate * p).clamp(0, 1))
        if self.rotate > 0:
            theta = _gate((torch.rand([batch], device=dev) * 2 - 1) * math.pi * self.rotate_max, p_rot, 0)
            then(_rotate2d(theta))  # inverse of rotating by -theta
        if self.aniso > 0:
            s = _gate(torch.exp2(torch.randn([batch], device=dev) * self.aniso_std), self.aniso * p, 1)
            then(_scale2d(1 / s, s))
        if self.rotate > 0:
            theta = _gate((torch.rand([batch], device=dev) * 2 - 1) * math.pi * self.rotate_max, p_rot, 0)
            then(_rotate2d(theta))
        if self.xfrac > 0:
            t = _gate(torch.randn([batch, 2], device=dev) * self.xfrac_std, self.xfrac * p, 0)
            then(_translate2d(-t[:, 0] * width, -t[:, 1] * height))
        return g_inv

    def _warp(self, images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
        """Apply the inverse transforms without leaking: pad, upsample 2x, resample, downsample 2x, crop."""
        batch, channels, height, width = images.shape
        dev = images.device
        # Padding: far enough that the transformed image corners (plus the filter support) stay inside.
        cx, cy = (width - 1) / 2, (height - 1) / 2
        corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1.0, 1.0, 1.0]], device=dev)
        reach = (g_inv @ corners)[:, :2, :].permute(1, 0, 2).reshape(2, -1)  # [xy, batch*corner]
        taps_pad = self.geom_taps.numel() // 4
        margin = torch.cat([-reach, reach]).amax(dim=1)  # [left, top, right, bottom]
        margin = margin + torch.tensor([2 * taps_pad - cx, 2 * taps_pad - cy] * 2, device=dev)
        margin = margin.clamp(min=0).minimum(torch.tensor([width - 1, height - 1] * 2, device=dev, dtype=margin.dtype))
        left, top, right, bottom = (int(v) for v in margin.ceil().tolist())

        images = F.pad(images, [left, right, top, bottom], mode="reflect")
        g_inv = _const2d(1, 1, (left - right) / 2, (top - bottom) / 2, dev) @ g_inv
        images = upsample2x(images, self.geom_taps)
        g_inv = _const2d(2, 2, 0, 0, dev) @ g_inv @ _const2d(0.5, 0.5, 0, 0, dev)
        g_inv = _const2d(1, 1, -0.5, -0.5, dev) @ g_inv @ _const2d(1, 1, 0.5, 0.5, dev)
        # Output: the image plus 2*taps_pad on each side, at 2x; map pixel to normalised [-1, 1] coordinates.
        out_h, out_w = (height + 2 * taps_pad) * 2, (width + 2 * taps_pad) * 2
        g_inv = (
            _const2d(2 / images.shape[3], 2 / images.shape[2], 0, 0, dev)
            @ g_inv
            @ _const2d(out_w / 2, out_h / 2, 0, 0, dev)
        )
        grid = F.affine_grid(g_inv[:, :2, :].to(images.dtype), [batch, channels, out_h, out_w], align_corners=False)
        images = grid_sample(images, grid)
        return downsample2x(images, self.geom_taps, crop=2 * taps_pad)

    # -- colour -------------------------------------------------------------------------------------------------

    def _color(self, batch: int, channels: int, p: torch.Tensor) -> torch.Tensor | None:
        """The colour matrix per image (``C @ [r, g, b, 1]``), ``[N, 4, 4]``, or None if nothing is enabled."""
        dev = p.device
        c_mat: torch.Tensor | None = None

        def then(m: torch.Tensor) -> None:
            nonlocal c_mat
            c_mat = m if c_mat is None else m @ c_mat

        luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev) / math.sqrt(3)
        luma_outer = torch.outer(luma, luma)
        if self.brightness > 0:
            b = _gate(torch.randn([batch], device=dev) * self.brightness_std, self.brightness * p, 0)
            then(_translate3d(b))
        if self.contrast > 0:
            c = _gate(torch.exp2(torch.randn([batch], device=dev) * self.contrast_std), self.contrast * p, 1)
            then(_scale3d(c))
        if self.lumaflip > 0:
            i = _gate(torch.floor(torch.rand([batch, 1, 1], device=dev) * 2), self.lumaflip * p, 0)
            then(torch.eye(4, device=dev) - 2 * luma_outer * i)  # Householder reflection of the luma axis
        if self.hue > 0 and channels > 1:
            theta = _gate((torch.rand([batch], device=dev) * 2 - 1) * math.pi * self.hue_max, self.hue * p, 0)
            then(_rotate3d(luma, theta))
        if self.saturation > 0 and channels > 1:
            s = _gate(torch.exp2(torch.randn([batch, 1, 1], device=dev) * self.saturation_std), self.saturation * p, 1)
            then(luma_outer + (torch.eye(4, device=dev) - luma_outer) * s)
        return c_mat

    @staticmethod
    def _apply_color(images: torch.Tensor, c_mat: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        flat = images.reshape(batch, channels, height * width)
        c_mat = c_mat.to(images.dtype)
        if channels == 3:
            flat = c_mat[:, :3, :3] @ flat + c_mat[:, :3, 3:]
        elif channels == 1:
            gray = c_mat[:, :3, :].mean(dim=1, keepdim=True)  # [N, 1, 4]: the average of the three colour rows
            flat = flat * gray[:, :, :3].sum(dim=2, keepdim=True) + gray[:, :, 3:]
        else:
            raise DataError(
                f"ADA colour transforms need 1 (grayscale) or 3 (RGB) channels, got {channels}; "
                "use a pipeline without colour (e.g. augmentation.pipeline=bg) or convert the images"
            )
        return flat.reshape(batch, channels, height, width)

    # -- filtering and corruptions --------------------------------------------------------------------------

    def _imgfilter(self, images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        dev = images.device
        bands = self.fbank.shape[0]
        expected_power = torch.tensor([10.0, 1.0, 1.0, 1.0], device=dev) / 13  # a 1/f spectrum over the bands
        gain = torch.ones([batch, bands], device=dev)
        for band, strength in enumerate(self.imgfilter_bands):
            amp = _gate(
                torch.exp2(torch.randn([batch], device=dev) * self.imgfilter_std), self.imgfilter * p * strength, 1
            )
            t = torch.ones([batch, bands], device=dev)
            t[:, band] = amp
            gain = gain * (t / (expected_power * t.square()).sum(dim=-1, keepdim=True).sqrt())  # keep power
        taps = (gain @ self.fbank).to(images.dtype)  # [N, taps]
        taps = taps.repeat_interleave(channels, dim=0)  # [N*C, taps]
        pad = self.fbank.shape[1] // 2
        x = reflect_pad(images.reshape(1, batch * channels, height, width), pad)
        x = F.conv2d(x, taps[:, None, None, :], groups=batch * channels)
        x = F.conv2d(x, taps[:, None, :, None], groups=batch * channels)
        return x.reshape(batch, channels, height, width)

    def _noise(self, images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        sigma = _gate(torch.randn([batch, 1, 1, 1], device=images.device).abs() * self.noise_std, self.noise * p, 0)
        noise = torch.randn(images.shape, device=images.device) * sigma
        return images + noise.to(images.dtype)

    def _cutout(self, images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        dev = images.device
        size = _gate(torch.full([batch, 2, 1, 1, 1], self.cutout_size, device=dev), self.cutout * p, 0)
        center = torch.rand([batch, 2, 1, 1, 1], device=dev)
        xs = (torch.arange(width, device=dev).reshape(1, 1, 1, -1) + 0.5) / width
        ys = (torch.arange(height, device=dev).reshape(1, 1, -1, 1) + 0.5) / height
        keep = ((xs - center[:, 0]).abs() >= size[:, 0] / 2) | ((ys - center[:, 1]).abs() >= size[:, 1] / 2)
        return images * keep.to(images.dtype)

    # -- the pipeline -------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
        if images.ndim != 4:
            raise DataError(f"ADA expects images [N, C, H, W], got shape {tuple(images.shape)}")
        batch, channels, height, width = images.shape
        p = torch.as_tensor(p, dtype=torch.float32, device=images.device)
        g_inv = self._geometry(batch, height, width, p)
        if g_inv is not None:
            images = self._warp(images, g_inv)
        c_mat = self._color(batch, channels, p)
        if c_mat is not None:
            images = self._apply_color(images, c_mat)
        if self.imgfilter > 0:
            images = self._imgfilter(images, p)
        if self.noise > 0:
            images = self._noise(images, p)
        if self.cutout > 0:
            images = self._cutout(images, p)
        return images

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name):g}" for name in MULTIPLIERS if getattr(self, name) > 0)


@dataclass
class ADAConfig(AdaptiveConfig):
    """Adaptive discriminator augmentation (Karras et al. 2020): stylegan2-ada-pytorch's AugmentPipe on every
    image D sees (reals and fakes, D and G steps), with ``p`` adapted so that E[sign(D(real))] approaches
    ``target``."""

    name: str = "ada"
    #: blit | geom | color | filter | noise | cutout | bg | bgc | bgcf | bgcfn | bgcfnc (train.py --augpipe).
    #: The study: bgcfnc, and bgcfn for mri (the modality overrides it).
    pipeline: str = DEFAULT_PIPELINE
    #: per-transform probability multipliers overriding the pipeline's, e.g. {cutout: 0, rotate: 0.5}
    strengths: dict[str, int | float] = field(default_factory=dict)


@AUGMENTATIONS.register("ada", config=ADAConfig)
class ADA(AdaptiveAugmentation):
    """Adaptive discriminator augmentation: :class:`AugmentPipe` on every image D sees, ``p`` adapted.

    ``strengths`` overrides the pipeline's per-transform multipliers (e.g. ``{"cutout": 0}``); ``pipe_kwargs``
    passes parameter ranges (``scale_std`` ...) to :class:`AugmentPipe`.
    """

    name = "ada"

    def __init__(
        self,
        pipeline: str = DEFAULT_PIPELINE,
        p: float = 0.0,
        adaptive: bool = True,
        target: float = DEFAULT_TARGET,
        interval: int = DEFAULT_INTERVAL,
        speed_kimg: float = DEFAULT_SPEED_KIMG,
        strengths: dict[str, float] | None = None,
        **pipe_kwargs: Any,
    ) -> None:
        super().__init__(p=p, adaptive=adaptive, target=target, interval=interval, speed_kimg=speed_kimg)
        multipliers = pipeline_multipliers(pipeline)
        if strengths is not None and not isinstance(strengths, Mapping):
            raise ConfigError(f"augmentation.strengths must be a mapping like {{cutout: 0}}, got {strengths!r}")
        for key, value in (strengths or {}).items():
            if key not in MULTIPLIERS:
                raise ConfigError(f"unknown ADA strength {key!r}; valid transforms: {', '.join(MULTIPLIERS)}")
            if not float(value) >= 0:
                raise ConfigError(f"ADA strength {key} must be >= 0, got {value!r}")
            multipliers[key] = float(value)
        try:
            self.pipe = AugmentPipe(**multipliers, **pipe_kwargs)
        except TypeError as err:
            raise ConfigError(f"invalid ADA pipeline argument: {err}") from None
        self.pipeline = pipeline

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not bool(self.p > 0):
            return images
        # In float32 (or float64) whatever the autocast context: resampling in half precision would blur the
        # images by rounding, and the double-backward of grid_sample needs one dtype throughout.
        with torch.autocast(device_type=images.device.type, enabled=False):
            work = images if images.dtype in (torch.float32, torch.float64) else images.float()
            return self.pipe(work, self.p).to(images.dtype)
