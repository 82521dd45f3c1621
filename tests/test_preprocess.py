"""Preprocessing equals a direct PIL computation (the clean-fid/StudioGAN recipe) bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fidmed.errors import ConfigError, FidmedError
from fidmed.features.preprocess import Preprocessing, preprocess


def _pil_clean(img_hwc_uint8: np.ndarray, size: int, clip: bool = False) -> np.ndarray:
    """The recipe written out independently: each channel as a 32-bit float PIL image, bicubic resize."""
    chans = []
    for k in range(img_hwc_uint8.shape[2]):
        im = Image.fromarray(img_hwc_uint8[:, :, k].astype(np.float32))
        assert im.mode == "F"
        r = np.asarray(im.resize((size, size), resample=Image.BICUBIC))
        chans.append(r.clip(0, 255) if clip else r)
    return np.stack(chans, 0).astype(np.float32)


def _random_images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_clean_rgb_equals_direct_pil_bitwise() -> None:
    x = _random_images(2, 3, 37, 53, seed=0)
    out = preprocess(x, Preprocessing("clean", 29))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 29, 29)
    for i in range(2):
        ref = _pil_clean(x[i].permute(1, 2, 0).numpy(), 29)
        assert np.array_equal(out[i].numpy(), ref)


def test_gray_is_converted_like_pil_rgb_and_resized_identically() -> None:
    x = _random_images(2, 1, 40, 31, seed=1)
    out = preprocess(x, Preprocessing("clean", 64))
    for i in range(2):
        rgb = np.asarray(Image.fromarray(x[i, 0].numpy()).convert("RGB"))  # the study's loaders
        assert np.array_equal(out[i].numpy(), _pil_clean(rgb, 64))
    # a 3-channel image with equal channels takes the resize-once shortcut: same numbers
    out3 = preprocess(x.expand(-1, 3, -1, -1).contiguous(), Preprocessing("clean", 64))
    assert torch.equal(out, out3)


def test_clean_keeps_bicubic_overshoot_and_clean_clip_clips() -> None:
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    x = torch.from_numpy(checker)[None, None].repeat(1, 3, 1, 1)
    x[0, 1] = 255 - x[0, 1]  # make the channels differ
    raw = preprocess(x, Preprocessing("clean", 23))
    clipped = preprocess(x, Preprocessing("clean_clip", 23))
    assert raw.min() < 0 and raw.max() > 255  # StudioGAN (the study) does not clip
    assert clipped.min() >= 0 and clipped.max() <= 255
    ref = _pil_clean(x[0].permute(1, 2, 0).numpy(), 23, clip=True)
    assert np.array_equal(clipped[0].numpy(), ref)


def test_nearest_equals_pil_rgb_nearest() -> None:
    x = _random_images(1, 3, 50, 45, seed=2)
    out = preprocess(x, Preprocessing("nearest", 32))
    ref = np.asarray(Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((32, 32), Image.NEAREST))
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), ref.astype(np.float32))


def test_same_size_is_exact_and_bgr_flips() -> None:
    x = _random_images(2, 3, 24, 24, seed=3)
    out = preprocess(x, Preprocessing("clean", 24))
    assert torch.equal(out, x.float())
    bgr = preprocess(x, Preprocessing("clean", 24, "BGR"))
    assert torch.equal(bgr, x.float().flip(1))


def test_key_and_validation() -> None:
    assert Preprocessing("clean", 299).key == "clean-299-RGB"
    assert Preprocessing("clean", 299) == Preprocessing("clean", 299, "RGB")
    with pytest.raises(ConfigError, match="unknown resizer"):
        Preprocessing("bilinear", 299)
    with pytest.raises(FidmedError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8), Preprocessing("clean", 8))
    with pytest.raises(FidmedError, match="C = 1"):
        preprocess(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), Preprocessing("clean", 8))
