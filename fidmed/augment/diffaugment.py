"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

Re-implements ``DiffAugment_pytorch.py`` of mit-han-lab/data-efficient-gans as used by its
``DiffAugment-stylegan2-pytorch`` (the version the study ran), where ``run_D`` augments every batch the
discriminator sees: real and generated images in the D step (R1 included), generated images in the G step.
fidmed does the same through ``Augmentation.__call__``.

Matched semantics (checked numerically against that file with equal seeds, see tests/test_augment.py):

- ``color`` = brightness, then saturation, then contrast, each drawn per image and always applied:
  brightness ``x + U(-0.5, 0.5)``; saturation ``(x - m_c) * U(0, 2) + m_c`` with ``m_c`` the mean over the
  channels of each pixel (for 1-channel images ``x - m_c`` is exactly 0: a no-op, although it still draws its
  random number); contrast ``(x - m) * U(0.5, 1.5) + m`` with ``m`` the mean over channels and pixels of
  each image;
- ``translation``: an integer shift per image, uniform in ``[-s, s]`` with ``s = int(size * 1/8 + 0.5)``,
  drawn separately for rows and columns; output pixel ``(i, j)`` is input ``(i + dy, j + dx)`` or 0 where
  that falls outside the image (zero padding);
- ``cutout``: a square of ``int(size * 1/2 + 0.5)`` pixels per side zeroed per image, its top-left corner at
  ``offset - size // 2`` with ``offset`` uniform in ``[0, H + 1 - size % 2)`` (clipped at the borders);
- the order of random draws (brightness, saturation, contrast, row shift, column shift, row offset, column
  offset), so that equal seeds give equal augmentations on the CPU.

Written with gathers and masks instead of the reference's advanced indexing (same values); gradients of any
order flow to the images. DiffAugment has no probability: ``p`` stays 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fidmed.augment.base import AUGMENTATIONS, Augmentation
from fidmed.errors import ConfigError, DataError

TRANSLATION_RATIO = 0.125  # DiffAugment_pytorch.rand_translation(ratio=0.125)
CUTOUT_RATIO = 0.5  # DiffAugment_pytorch.rand_cutout(ratio=0.5)


def _per_image_uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Add ``U(-0.5, 0.5)`` per image."""
    return x + (_per_image_uniform(x) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by ``U(0, 2)`` per image."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_image_uniform(x) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale each image's deviation from its mean by ``U(0.5, 1.5)``."""
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_per_image_uniform(x) + 0.5) + mean


def _shift_axis(x: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[..., i, ...] = x[..., i + shift[n], ...]`` along ``dim`` (2 or 3), zero where out of range."""
    size = x.shape[dim]
    src = torch.arange(size, device=x.device)[None, :] + shift.reshape(-1, 1)  # [N, size]
    inside = (src >= 0) & (src < size)
    shape = [x.shape[0], 1, 1, 1]
    shape[dim] = size
    src = src.clamp(0, size - 1).reshape(shape).expand_as(x)
    return x.gather(dim, src) * inside.reshape(shape).to(x.dtype)


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by whole pixels, up to ``int(size * ratio + 0.5)`` per axis, filling with zeros."""
    batch, _, height, width = x.shape
    max_dy, max_dx = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, size=[batch, 1, 1], device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, size=[batch, 1, 1], device=x.device)
    return _shift_axis(_shift_axis(x, dy, 2), dx, 3)


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero one ``int(size * ratio + 0.5)``-pixel square per image at a uniformly drawn offset."""
    batch, _, height, width = x.shape
    cut_h, cut_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    off_y = torch.randint(0, height + (1 - cut_h % 2), size=[batch, 1, 1], device=x.device)
    off_x = torch.randint(0, width + (1 - cut_w % 2), size=[batch, 1, 1], device=x.device)
    top, left = off_y.reshape(-1, 1) - cut_h // 2, off_x.reshape(-1, 1) - cut_w // 2  # [N, 1]
    rows = torch.arange(height, device=x.device)[None, :]
    cols = torch.arange(width, device=x.device)[None, :]
    in_rows = (rows >= top) & (rows < top + cut_h)  # [N, H]
    in_cols = (cols >= left) & (cols < left + cut_w)  # [N, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


POLICIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}


def parse_policy(policy: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"color,translation"`` or ``["color", "translation"]`` -> names, or a ConfigError listing the valid ones."""
    if policy is None:
        return ()
    if not isinstance(policy, (str, Sequence)):
        raise ConfigError(
            f"augmentation.policy must be a comma-separated string or a list of names, got "
            f"{policy!r} (e.g. augmentation.policy=[color,translation])"
        )
    names = policy.split(",") if isinstance(policy, str) else [str(p) for p in policy]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(
            f"unknown DiffAugment policy {', '.join(map(repr, unknown))}; valid: {', '.join(POLICIES)} "
            "(comma-separated, e.g. augmentation.policy='color,translation,cutout')"
        )
    return tuple(names)


def diff_augment(x: torch.Tensor, policy: Sequence[str]) -> torch.Tensor:
    """Apply the named policies in order (``x``: ``[N, C, H, W]``)."""
    for name in policy:
        for transform in POLICIES[name]:
            x = transform(x)
    return x


@dataclass
class DiffAugmentConfig:
    """DiffAugment (Zhao et al. 2020) on every image D sees: reals and fakes, D and G steps."""

    name: str = "diffaugment"
    #: comma-separated list of color | translation | cutout, applied in that order. The study: all three, and
    #: color,translation for mri (the modality overrides it). On the command line quote it,
    #: ``augmentation.policy='"color,translation"'``, or write a list, ``augmentation.policy=[color,translation]``
    #: (a string or a list of names: kept as given, so the training fingerprint is what it was)
    policy: Any = "color,translation,cutout"


@AUGMENTATIONS.register("diffaugment", config=DiffAugmentConfig)
class DiffAugment(Augmentation):
    """DiffAugment with a comma-separated ``policy`` (default ``color,translation,cutout``)."""

    name = "diffaugment"

    def __init__(self, policy: str | Sequence[str] = "color,translation,cutout") -> None:
        super().__init__()
        self.policy = parse_policy(policy)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise DataError(f"DiffAugment expects images [N, C, H, W], got shape {tuple(images.shape)}")
        return diff_augment(images, self.policy)

    def extra_repr(self) -> str:
        return f"policy={','.join(self.policy)}"
