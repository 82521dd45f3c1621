"""Augmentation settings: ADA, APA, DiffAugment, the adaptive-p controller, their registry and build_augmentation.

Statistical tests draw a few thousand tiny images with a fixed seed and compare sample statistics with the
specified distributions; each tolerance is a stated number of standard errors derived from the sample size,
so a wrong distribution (e.g. a std of 0.25 instead of 0.2) fails while the right one passes for any seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fidmed.augment import AUGMENTATIONS, Augmentation, augmentation_options, build_augmentation
from fidmed.augment.ada import (
    ADA,
    MULTIPLIERS,
    PIPELINES,
    SYM6,
    AugmentPipe,
    downsample2x,
    filter_bank,
    grid_sample,
    reflect_pad,
    upsample2x,
)
from fidmed.augment.apa import APA
from fidmed.augment.controller import AdaptiveAugmentation, AdaptiveP
from fidmed.augment.diffaugment import DiffAugment, brightness, contrast, cutout, saturation, translation
from fidmed.errors import ConfigError


def _seeded(fn, seed: int = 0):
    """``fn`` made deterministic: each call draws the same random numbers (for gradcheck)."""

    def wrapped(*args):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return fn(*args)

    return wrapped


def _binomial_tol(p: float, n: int, sigmas: float = 4.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------------------
# Resampling building blocks


def test_grid_sample_matches_native_forward_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 9, 11, requires_grad=True)
    theta = torch.tensor([[0.9, 0.3, 0.1], [-0.2, 1.2, -0.05]]).expand(3, 2, 3)
    grid = F.affine_grid(theta, [3, 2, 12, 10], align_corners=False)
    ours = grid_sample(x, grid)
    native = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.equal(ours, native)
    w = torch.randn_like(native)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    (g_native,) = torch.autograd.grad((native * w).sum(), x)
    torch.testing.assert_close(g_ours, g_native, rtol=0, atol=1e-6)


def test_grid_sample_has_correct_second_derivatives():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([[1.1, 0.2, 0.05], [-0.3, 0.8, 0.1]], dtype=torch.float64).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 1, 8, 5], align_corners=False)
    fn = lambda t: grid_sample(t, grid)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def _upfirdn_1d(
    x: np.ndarray, f: np.ndarray, up: int, down: int, pad0: int, pad1: int, flip: bool, gain: float
) -> np.ndarray:
    """The upfirdn2d definition along one axis: zero-insert, pad (negative = crop), convolve, decimate."""
    z = np.zeros(len(x) * up)
    z[::up] = x
    z = np.concatenate([np.zeros(max(pad0, 0)), z, np.zeros(max(pad1, 0))])
    z = z[max(-pad0, 0) : len(z) - max(-pad1, 0)]
    k = f * gain if flip else (f * gain)[::-1]  # flip=False: true convolution
    out = np.array([np.dot(z[i : i + len(k)], k) for i in range(len(z) - len(k) + 1)])
    return out[::down]


def test_up_and_downsampling_match_the_upfirdn_definition():
    taps = np.asarray(SYM6) / np.sum(SYM6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal([7, 9])
    t = torch.tensor(taps, dtype=torch.float64)
    # upsample2d(up=2): padding ((L+1)//2, (L-2)//2) = (6, 5), gain 2 per axis.
    expected = np.stack([_upfirdn_1d(r, taps, 2, 1, 6, 5, False, 2.0) for r in x])
    expected = np.stack([_upfirdn_1d(c, taps, 2, 1, 6, 5, False, 2.0) for c in expected.T]).T
    ours = upsample2x(torch.tensor(x)[None, None], t)[0, 0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    # downsample2d(down=2, padding=-6, flip_filter=True): padding -6 + (L-1)//2 = -1, correlation.
    y = rng.standard_normal([30, 34])
    expected = np.stack([_upfirdn_1d(r, taps, 1, 2, -1, -1, True, 1.0) for r in y])
    expected = np.stack([_upfirdn_1d(c, taps, 1, 2, -1, -1, True, 1.0) for c in expected.T]).T
    ours = downsample2x(torch.tensor(y)[None, None], t, crop=6)[0, 0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_filter_bank_is_a_partition_of_unity_of_symmetric_bands():
    bank = filter_bank()
    assert bank.shape == (4, 43)  # 1 tap, then 3 octaves of (2n - 1) + 6 taps: 7, 19, 43
    impulse = np.zeros(43)
    impulse[21] = 1
    np.testing.assert_allclose(bank.sum(axis=0), impulse, atol=1e-12)
    np.testing.assert_allclose(bank, bank[:, ::-1], atol=1e-15)
    np.testing.assert_allclose(bank.sum(axis=1), [1, 0, 0, 0], atol=1e-12)  # DC only in the lowest band


def test_reflect_pad_agrees_with_torch_and_extends_periodically():
    x = torch.arange(20.0).reshape(1, 1, 4, 5)
    torch.testing.assert_close(reflect_pad(x, 3), F.pad(x, [3] * 4, mode="reflect"))
    big = reflect_pad(x, 9)
    assert big.shape == (1, 1, 22, 23)
    row = big[0, 0, 9].tolist()  # row 0 of x, extended: mirror period 2 * (5 - 1) = 8
    expected = [[0, 1, 2, 3, 4, 3, 2, 1][(i % 8)] for i in range(-9, 14)]
    assert row == [float(v) for v in expected]


# ------------------------------------------------------------------------------------------------------------
# ADA: agreement with stylegan2-ada-pytorch, identity, differentiability

# Measured by running stylegan2-ada-pytorch's training/augment.py AugmentPipe (NVlabs release, CPU, torch 2.14)
# with the bgcfnc multipliers, p = 0.8, on x = randn([4, C, 24, 24], generator seeded 2024) after
# torch.manual_seed(11): (sum, sum of squares, out[:, 0, 12, 12]).
REFERENCE_ADA = {
    1: (57.85142517089844, 2203.603759765625, [0.05409, -0.302099, -0.0, -1.057451]),
    3: (-40.514366149902344, 5333.63037109375, [-0.277006, -1.885065, -0.085294, 0.2325]),
}


@pytest.mark.parametrize("channels", [1, 3])
def test_ada_matches_reference_pipeline_with_equal_seeds(channels):
    x = torch.randn(4, channels, 24, 24, generator=torch.Generator().manual_seed(2024))
    pipe = AugmentPipe(**{k: 1 for k in PIPELINES["bgcfnc"]})
    torch.manual_seed(11)
    y = pipe(x, 0.8)
    total, squares, centre = REFERENCE_ADA[channels]
    # float32 resampling in a different summation order: ~1e-5 absolute on values of order 1 (measured 1.2e-5).
    assert y.sum().item() == pytest.approx(total, abs=1e-3)
    assert y.square().sum().item() == pytest.approx(squares, rel=1e-5)
    np.testing.assert_allclose(y[:, 0, 12, 12].numpy(), centre, atol=5e-5)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_ada_is_exact_identity_at_p_zero(pipeline):
    aug = ADA(pipeline=pipeline, p=0.0, adaptive=False)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(aug(x), x)


def test_ada_with_probability_one_changes_images_and_keeps_shape():
    aug = ADA(pipeline="bgcfnc", p=1.0, adaptive=False)
    x = torch.randn(4, 1, 16, 16)
    y = aug(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_gradients_through_every_pipeline_are_correct(pipeline):
    pipe = AugmentPipe(**{k: 1 for k in PIPELINES[pipeline]})
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    fn = _seeded(lambda t: pipe(t, 0.9), seed=3)
    assert torch.autograd.gradcheck(fn, (x,), atol=1e-6, fast_mode=True)


def test_r1_double_backward_through_bgcfnc_on_cpu():
    """R1 as the loss computes it: grad of sum(D(aug(x))) w.r.t. x with create_graph, then backward into D."""
    torch.manual_seed(0)
    aug = ADA(pipeline="bgcfnc", p=1.0, adaptive=False)
    disc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Softplus(), torch.nn.Conv2d(4, 1, 3))
    x = torch.randn(8, 1, 16, 16, requires_grad=True)
    logits = disc(aug(x)).sum()
    (r1_grads,) = torch.autograd.grad(logits, x, create_graph=True)
    r1_grads.square().sum().backward()
    # Every parameter but the last bias (which cannot change grad_x D) receives a finite, non-zero gradient.
    grads = [p.grad for p in list(disc.parameters())[:-1]]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert disc[2].bias.grad is None or float(disc[2].bias.grad.abs().sum()) == 0.0


def test_second_derivatives_through_bgcfnc_are_correct():
    pipe = AugmentPipe(**{k: 1 for k in PIPELINES["bgcfnc"]})
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    # A non-linear function of the augmented image, so the second derivative is not zero.
    fn = _seeded(lambda t: torch.tanh(pipe(t, 0.9)), seed=5)
    assert torch.autograd.gradgradcheck(fn, (x,), atol=1e-5, fast_mode=True)


# ------------------------------------------------------------------------------------------------------------
# ADA: transform statistics


def _pipe_stats(seed: int = 0, **multipliers) -> AugmentPipe:
    torch.manual_seed(seed)
    return AugmentPipe(**multipliers)


def test_xflip_rate_is_half_of_p():
    n, p = 2000, 0.5
    pipe = _pipe_stats(xflip=1)
    x = torch.randn(n, 1, 16, 16)
    y = pipe(x, p)
    err_same = (y - x).abs().mean(dim=(1, 2, 3))
    err_flip = (y - x.flip(3)).abs().mean(dim=(1, 2, 3))
    flipped = err_flip < err_same
    # Unflipped images come back exactly (up to float rounding). Flipped ones are flips up to a blur: the
    # sym6 filter is not symmetric, so up- and downsampling only reconstruct exactly without mirroring (the
    # reference behaves the same); they are still far closer to the flip than to the original.
    assert err_same[~flipped].max() < 1e-5
    assert (err_flip[flipped] < 0.5 * err_same[flipped]).all()
    rate = flipped.float().mean().item()
    assert abs(rate - p / 2) < _binomial_tol(p / 2, n)


def test_rotate90_picks_each_quarter_turn_equally():
    n = 2000
    pipe = _pipe_stats(rotate90=1)
    x = torch.randn(n, 1, 16, 16)
    y = pipe(x, 1.0)
    errs = torch.stack([(y - x.rot90(k, dims=(2, 3))).abs().mean(dim=(1, 2, 3)) for k in range(4)], 1)
    ranked = errs.sort(dim=1).values
    assert (ranked[:, 0] < 0.5 * ranked[:, 1]).all()  # each image is clearly one quarter turn (see xflip)
    freq = torch.bincount(errs.argmin(1), minlength=4).float() / n
    assert (freq - 0.25).abs().max() < _binomial_tol(0.25, n)


def test_integer_translation_distribution():
    """xint_max 0.125 at 16 px: round(U(-2, 2)) -> P(0) = P(+-1) = 1/4 each, P(+-2) = 1/8 each, per axis."""
    n = 2000
    pipe = _pipe_stats(xint=1)
    x = torch.randn(n, 1, 16, 16)
    y = pipe(x, 1.0)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    inner = (slice(None), slice(None), slice(3, 13), slice(3, 13))
    errs = torch.stack([(y - x.roll((dy, dx), dims=(2, 3)))[inner].abs().amax(dim=(1, 2, 3)) for dy, dx in shifts], 1)
    assert errs.amin(1).max() < 1e-4
    best = torch.tensor(shifts)[errs.argmin(1)]
    expected = {-2: 1 / 8, -1: 1 / 4, 0: 1 / 4, 1: 1 / 4, 2: 1 / 8}
    for axis in range(2):
        for value, prob in expected.items():
            freq = (best[:, axis] == value).float().mean().item()
            assert abs(freq - prob) < _binomial_tol(prob, n), (axis, value, freq)


def test_isotropic_scale_log2_std():
    """scale_std 0.2: log2 of the scale factor ~ N(0, 0.2); measured from a centred Gaussian blob's spread."""
    n = 600
    pipe = _pipe_stats(scale=1)
    coords = torch.arange(32.0) - 15.5
    blob = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 3.0**2))
    x = blob.expand(n, 1, 32, 32).clone()
    y = pipe(x, 1.0)

    def spread(img):  # second moment of the (non-negative) intensity around the centre
        w = img.clamp(min=0)[:, 0]
        r2 = coords[:, None] ** 2 + coords[None, :] ** 2
        return ((w * r2).sum((1, 2)) / w.sum((1, 2))).sqrt()

    log2_scale = torch.log2(spread(y) / spread(x))
    sd = log2_scale.std().item()
    # se of a sample std is sd / sqrt(2n) = 0.0058 here; blob truncation and resampling bias the measurement
    # slightly, so allow 6 se.
    assert abs(sd - 0.2) < 6 * 0.2 / math.sqrt(2 * n)
    assert abs(log2_scale.mean().item()) < 6 * 0.2 / math.sqrt(n)


def test_brightness_offset_distribution():
    n, p = 4000, 0.5
    pipe = _pipe_stats(brightness=1)
    x = torch.randn(n, 1, 16, 16)
    b = (pipe(x, p) - x).mean(dim=(1, 2, 3))
    applied = b != 0
    assert abs(applied.float().mean().item() - p) < _binomial_tol(p, n)
    m = int(applied.sum())
    assert abs(b[applied].std().item() - 0.2) < 5 * 0.2 / math.sqrt(2 * m)
    assert abs(b[applied].mean().item()) < 5 * 0.2 / math.sqrt(m)


def test_contrast_log2_factor_distribution():
    n = 4000
    pipe = _pipe_stats(contrast=1)
    x = torch.rand(n, 1, 16, 16) + 0.5
    c = torch.log2((pipe(x, 1.0) / x).mean(dim=(1, 2, 3)))
    assert abs(c.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)


def test_lumaflip_negates_grayscale_at_rate_half_p():
    n, p = 4000, 0.8
    pipe = _pipe_stats(lumaflip=1)
    x = torch.randn(n, 1, 8, 8)
    y = pipe(x, p)
    flipped = torch.isclose(y, -x, atol=1e-6).all(dim=(1, 2, 3))
    kept = torch.isclose(y, x, atol=1e-6).all(dim=(1, 2, 3))
    assert bool((flipped | kept).all())
    assert abs(flipped.float().mean().item() - p / 2) < _binomial_tol(p / 2, n)


def test_hue_and_saturation_are_noops_on_grayscale_and_draw_nothing():
    pipe = AugmentPipe(hue=1, saturation=1)
    x = torch.randn(16, 1, 8, 8)
    state = torch.get_rng_state()
    y = pipe(x, 1.0)
    assert torch.equal(y, x)
    assert torch.equal(torch.get_rng_state(), state)  # like the reference: no draws for 1-channel images


def _luma_chroma(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    luma = img.mean(dim=1, keepdim=True)
    return luma, img - luma


def test_saturation_scales_chroma_with_log2_std_one_and_keeps_luma():
    n = 4000
    pipe = _pipe_stats(saturation=1)
    x = torch.randn(n, 3, 4, 4)
    y = pipe(x, 1.0)
    (lx, cx), (ly, cy) = _luma_chroma(x), _luma_chroma(y)
    torch.testing.assert_close(ly, lx, atol=1e-5, rtol=0)
    s = torch.log2(cy.flatten(1).norm(dim=1) / cx.flatten(1).norm(dim=1))
    assert abs(s.std().item() - 1.0) < 5 / math.sqrt(2 * n)


def test_hue_rotation_keeps_luma_and_chroma_norm_and_angle_is_uniform():
    n = 4000
    pipe = _pipe_stats(hue=1)
    x = torch.randn(n, 3, 1, 1)
    y = pipe(x, 1.0)
    (lx, cx), (ly, cy) = _luma_chroma(x), _luma_chroma(y)
    torch.testing.assert_close(ly, lx, atol=1e-5, rtol=0)
    torch.testing.assert_close(cy.norm(dim=1), cx.norm(dim=1), atol=1e-5, rtol=1e-5)
    cos = (cx * cy).sum(1) / (cx.norm(dim=1) * cy.norm(dim=1))
    angle = torch.arccos(cos.clamp(-1, 1)).flatten()  # |theta| with theta ~ U(-pi, pi) -> U(0, pi)
    assert abs(angle.mean().item() - math.pi / 2) < 5 * (math.pi / math.sqrt(12)) / math.sqrt(n)


def test_imgfilter_with_unit_gains_is_identity():
    pipe = AugmentPipe(imgfilter=1)
    x = torch.randn(4, 3, 24, 24)
    torch.testing.assert_close(pipe(x, 0.0), x, atol=1e-5, rtol=0)  # p = 0: every band gain is 1


def test_imgfilter_amplifies_bands_with_power_normalisation():
    """A constant image only has band 0 (DC): the separable filter scales it by g0^2 (g0 along each axis)."""
    n = 2000
    pipe = _pipe_stats(imgfilter=1, imgfilter_bands=(1, 0, 0, 0))  # only band 0 drawn
    y = pipe(torch.ones(n, 1, 24, 24), 1.0)
    g0 = y.mean(dim=(1, 2, 3))
    # t = 2^N(0,1) for band 0, normalised by sqrt((10 t^2 + 3) / 13): an independent Monte-Carlo of g0.
    t = torch.exp2(torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    expected = (t / torch.sqrt((10 * t**2 + 3) / 13)) ** 2
    assert abs(g0.mean().item() - expected.mean().item()) < 5 * expected.std().item() / math.sqrt(n)


def test_noise_sigma_distribution():
    n = 4000
    pipe = _pipe_stats(noise=1)
    x = torch.zeros(n, 1, 32, 32)
    sigma = pipe(x, 1.0).std(dim=(1, 2, 3))
    # sigma = |N(0, 0.1)|: mean 0.1 * sqrt(2 / pi), sd 0.1 * sqrt(1 - 2 / pi).
    mean, sd = 0.1 * math.sqrt(2 / math.pi), 0.1 * math.sqrt(1 - 2 / math.pi)
    assert abs(sigma.mean().item() - mean) < 5 * sd / math.sqrt(n)


def test_cutout_rate_size_and_area():
    n, p, size = 4000, 0.5, 16
    pipe = _pipe_stats(cutout=1)
    y = pipe(torch.ones(n, 1, size, size), p)
    cut = y == 0
    hit = cut.any(dim=(1, 2, 3))
    assert abs(hit.float().mean().item() - p) < _binomial_tol(p, n)
    rows = cut.any(dim=3)[:, 0].sum(1)
    cols = cut.any(dim=2)[:, 0].sum(1)
    assert rows.max() <= 8 and cols.max() <= 8  # a 0.5 x 0.5 rectangle covers at most 8 pixel centres
    # Every cut pixel lies in the rectangle spanned by the cut rows and columns.
    assert int(cut.sum()) == int((rows * cols).sum())
    # Expected cut fraction per axis: mean over pixel centres u_k of P(|u_k - c| < 1/4), c ~ U(0, 1).
    u = (np.arange(size) + 0.5) / size
    per_axis = np.mean(np.minimum(1, u + 0.25) - np.maximum(0, u - 0.25))
    area = cut[hit].float().mean().item()  # mean cut fraction of the images that were cut
    assert abs(area - per_axis**2) < 0.01  # per-image area sd ~0.08, se over ~2000 images ~0.002


def test_ada_rejects_other_channel_counts():
    from fidmed.errors import DataError

    with pytest.raises(DataError, match="1 .*or 3"):
        AugmentPipe(brightness=1)(torch.randn(2, 2, 8, 8), 1.0)


# ------------------------------------------------------------------------------------------------------------
# The adaptive-p controller


def _feed(aug: AdaptiveAugmentation, sign: float, minibatches: int, batch: int = 8) -> None:
    for _ in range(minibatches):
        aug.observe_real_logits(torch.full([batch, 1], sign))
        aug.end_minibatch(batch)


def test_controller_moves_p_up_and_down_by_the_reference_step():
    aug = APA(p=0.0, target=0.6, interval=4, speed_kimg=500)
    step = 8 * 4 / (500 * 1000)  # batch * interval / (speed_kimg * 1000)
    _feed(aug, +1.0, 3)
    assert aug.probability == 0.0  # no decision before `interval` minibatches
    _feed(aug, +1.0, 1)
    expected = torch.tensor(0.0) + step  # float32 accumulation, as the reference's p buffer
    assert aug.probability == pytest.approx(float(expected), abs=1e-9)
    _feed(aug, +1.0, 4 * 9)
    for _ in range(9):
        expected = expected + step
    assert aug.probability == pytest.approx(float(expected), abs=1e-8)
    _feed(aug, -1.0, 8)
    for _ in range(2):
        expected = expected - step
    assert aug.probability == pytest.approx(float(expected), abs=1e-8)
    assert aug.stats()["augment/rt"] == -1.0


def test_controller_uses_the_mean_sign_against_the_target():
    aug = APA(p=0.5, target=0.6, interval=1, speed_kimg=1)
    aug.observe_real_logits(torch.tensor([1.0, 1.0, 1.0, -1.0, 0.0]))  # mean 0.4 < 0.6: p goes down
    aug.end_minibatch(5)
    assert aug.probability == pytest.approx(0.5 - 5 / 1000)
    aug.observe_real_logits(torch.tensor([2.0, 3.0, 4.0, 5.0, -1.0]))  # mean 0.6 == target: unchanged
    aug.end_minibatch(5)
    assert aug.probability == pytest.approx(0.5 - 5 / 1000)
    aug.end_minibatch(5)  # nothing observed: unchanged (the reference would produce NaN)
    assert aug.probability == pytest.approx(0.5 - 5 / 1000)


def test_controller_clamps_p_to_unit_interval():
    aug = APA(p=0.999, interval=1, speed_kimg=0.001)  # one image moves p by 1
    _feed(aug, +1.0, 3)
    assert aug.probability == 1.0
    _feed(aug, -1.0, 3)
    assert aug.probability == 0.0
    _feed(aug, -1.0, 3)
    assert aug.probability == 0.0


def test_fixed_p_never_moves_and_has_no_controller_state():
    aug = ADA(p=0.3, adaptive=False)
    _feed(aug, +1.0, 20)
    assert aug.probability == pytest.approx(0.3)
    assert set(aug.state_dict()) == {"p"}


def test_state_dict_round_trip_restores_p_and_accumulators():
    torch.manual_seed(0)
    logits = [torch.randn(8, 1) + 0.8 for _ in range(11)]
    a = APA(p=0.2, interval=4, speed_kimg=0.5)
    for lg in logits[:6]:  # stop mid-interval
        a.observe_real_logits(lg)
        a.end_minibatch(8)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()}
    b = APA(p=0.0, interval=4, speed_kimg=0.5)
    b.load_state_dict(state)
    assert b.probability == a.probability
    assert float(b.controller.sign_sum) == float(a.controller.sign_sum) != 0
    assert b.controller.minibatches == a.controller.minibatches == 6
    for lg in logits[6:]:
        for aug in (a, b):
            aug.observe_real_logits(lg)
            aug.end_minibatch(8)
    assert a.probability == b.probability != pytest.approx(0.2)
    assert float(a.controller.sign_sum) == float(b.controller.sign_sum)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ctrl = AdaptiveP(target=0.6, interval=2, speed_kimg=1)
        p = torch.tensor(0.5)
        # Rank 0 sees 4 positive logits per minibatch, rank 1 sees 12 negative ones: the global mean sign is
        # (4 - 12) / 16 = -0.5 < 0.6 (p must go down), although rank 0 alone would raise p.
        for _ in range(2):
            ctrl.observe(torch.full([4], 1.0) if rank == 0 else torch.full([12], -1.0))
            ctrl.end_minibatch(p, 4 if rank == 0 else 12)
        torch.save({"p": p, "rt": ctrl.rt}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_controller_sums_statistics_across_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Two minibatches of 4 + 12 images: p -= 32 / 1000.
    for res in results:
        assert float(res["p"]) == pytest.approx(0.5 - 32 / 1000, abs=1e-7)
        assert float(res["rt"]) == pytest.approx(-0.5)


# ------------------------------------------------------------------------------------------------------------
# APA


class _FakeSource:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.weight = torch.nn.Parameter(torch.ones([]))
        self.shape = shape
        self.calls: list[int] = []

    def __call__(self, n: int) -> torch.Tensor:
        self.calls.append(n)
        return self.weight * torch.full((n, *self.shape), 7.0)  # requires grad: APA must detach it


def test_apa_replaces_at_rate_p_with_detached_fakes():
    torch.manual_seed(0)
    p, batches, batch = 0.3, 250, 16
    aug = APA(p=p, adaptive=False)
    source = _FakeSource((1, 4, 4))
    replaced = 0
    for _ in range(batches):
        real = torch.randn(batch, 1, 4, 4)
        calls_before = len(source.calls)
        out = aug.replace_reals(real, source)
        is_fake = (out == 7.0).all(dim=(1, 2, 3))
        assert not out.requires_grad  # the fakes were detached from the generator's parameter
        assert torch.equal(out[~is_fake], real[~is_fake])
        n = int(is_fake.sum())
        replaced += n
        # make_fake is called once, for exactly the replaced images, and not at all when none is replaced.
        assert source.calls[calls_before:] == ([n] if n else [])
    n = batches * batch
    assert abs(replaced / n - p) < _binomial_tol(p, n)
    assert sum(source.calls) == replaced


def test_apa_at_p_zero_never_calls_the_generator():
    aug = APA(p=0.0)
    source = _FakeSource((1, 4, 4))
    real = torch.randn(8, 1, 4, 4)
    assert aug.replace_reals(real, source) is real
    assert source.calls == []


def test_apa_leaves_images_shown_to_d_untouched():
    aug = APA(p=1.0, adaptive=False)
    x = torch.randn(4, 1, 8, 8)
    assert aug(x) is x


# ------------------------------------------------------------------------------------------------------------
# DiffAugment

# Measured by running DiffAugment_pytorch.py of mit-han-lab/data-efficient-gans (DiffAugment-stylegan2-pytorch)
# with policy color,translation,cutout on x = randn([4, C, 16, 16], generator seeded 2024) after
# torch.manual_seed(11): (sum, sum of squares, out[:, 0, 8, 8]).
REFERENCE_DIFFAUGMENT = {
    1: (-78.92204284667969, 1078.32861328125, [-1.406439, 0.971491, 0.0, -0.243287]),
    3: (-142.62210083007812, 3206.3076171875, [-1.442557, 0.129926, 0.0, 0.927965]),
}


@pytest.mark.parametrize("channels", [1, 3])
def test_diffaugment_matches_reference_with_equal_seeds(channels):
    x = torch.randn(4, channels, 16, 16, generator=torch.Generator().manual_seed(2024))
    torch.manual_seed(11)
    y = DiffAugment("color,translation,cutout")(x)
    total, squares, centre = REFERENCE_DIFFAUGMENT[channels]
    assert y.sum().item() == pytest.approx(total, rel=1e-6)
    assert y.square().sum().item() == pytest.approx(squares, rel=1e-6)
    np.testing.assert_allclose(y[:, 0, 8, 8].numpy(), centre, atol=1e-6)


def test_diffaugment_color_distributions():
    n = 4000
    torch.manual_seed(0)
    x = torch.randn(n, 3, 4, 4)
    b = (brightness(x) - x).mean(dim=(1, 2, 3))  # U(-0.5, 0.5): mean 0, sd 1/sqrt(12)
    assert b.min() >= -0.5 and b.max() <= 0.5
    assert abs(b.std().item() - 1 / math.sqrt(12)) < 5 * 0.5 / math.sqrt(12) / math.sqrt(n)  # sd(s) <~ s/sqrt(2n)
    _, cx = _luma_chroma(x)
    _, cy = _luma_chroma(saturation(x))
    s = cy.flatten(1).norm(dim=1) / cx.flatten(1).norm(dim=1)  # U(0, 2)
    assert s.min() >= 0 and s.max() <= 2 and abs(s.mean().item() - 1) < 5 * (2 / math.sqrt(12)) / math.sqrt(n)
    dx = x - x.mean(dim=(1, 2, 3), keepdim=True)
    y = contrast(x)
    c = (y - y.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).norm(dim=1) / dx.flatten(1).norm(dim=1)  # U(0.5, 1.5)
    assert c.min() >= 0.5 - 1e-6 and c.max() <= 1.5 + 1e-6
    assert abs(c.mean().item() - 1) < 5 * (1 / math.sqrt(12)) / math.sqrt(n)


def test_diffaugment_saturation_is_exact_noop_on_grayscale():
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(saturation(x), x)


def test_diffaugment_translation_range_and_zero_padding():
    """16 px, ratio 1/8: shift uniform over -2..2 per axis (int(16 / 8 + 0.5) = 2), zeros shifted in."""
    n = 2000
    torch.manual_seed(0)
    x = torch.rand(n, 1, 16, 16) + 1  # strictly positive, so zeros mark padding
    y = translation(x)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]

    def shifted(dy, dx):  # out[i, j] = x[i + dy, j + dx], zero outside
        padded = F.pad(x, [2, 2, 2, 2])
        return padded[:, :, 2 + dy : 18 + dy, 2 + dx : 18 + dx]

    matches = torch.stack([(y == shifted(dy, dx)).all(dim=(1, 2, 3)) for dy, dx in shifts], 1)
    assert bool((matches.sum(1) == 1).all())
    best = torch.tensor(shifts)[matches.float().argmax(1)]
    for axis in range(2):
        freq = torch.bincount(best[:, axis] + 2, minlength=5).float() / n
        assert (freq - 0.2).abs().max() < _binomial_tol(0.2, n)


def test_diffaugment_cutout_square_and_area():
    n, size = 2000, 16
    torch.manual_seed(0)
    y = cutout(torch.ones(n, 1, size, size))
    cut = y[:, 0] == 0
    rows, cols = cut.any(dim=2).sum(1), cut.any(dim=1).sum(1)
    assert int(cut.sum()) == int((rows * cols).sum())  # one rectangle per image
    assert rows.max() == 8 and cols.max() == 8  # int(16 * 0.5 + 0.5) = 8 pixels when fully inside
    # Offset o uniform on 0..16 (17 values), rows o-4 .. o+3 clipped to the image: expected covered rows.
    covered = np.mean([len(set(range(o - 4, o + 4)) & set(range(size))) for o in range(17)])
    assert abs(rows.float().mean().item() - covered) < 5 * rows.float().std().item() / math.sqrt(n)
    assert abs(cut.float().mean().item() - (covered / size) ** 2) < 0.01


def test_diffaugment_is_twice_differentiable():
    aug = DiffAugment("color,translation,cutout")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    fn = _seeded(lambda t: torch.tanh(aug(t)), seed=1)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


# ------------------------------------------------------------------------------------------------------------
# The registry, build_augmentation and the config group

#: The options (and their types) of the YAML files the config schemas replaced: the training fingerprint of a
#: configuration hashes them, so the schemas' defaults must be exactly these.
HISTORIC_DEFAULTS = {
    "noaug": {"name": "noaug"},
    "ada": {
        "name": "ada",
        "pipeline": "bgcfnc",
        "target": 0.6,
        "interval": 4,
        "speed_kimg": 500,
        "p": 0.0,
        "adaptive": True,
        "strengths": {},
    },
    "apa": {"name": "apa", "target": 0.6, "interval": 4, "speed_kimg": 500, "p": 0.0, "adaptive": True},
    "diffaugment": {"name": "diffaugment", "policy": "color,translation,cutout"},
}


def _typed(d):
    return {k: (type(v).__name__, _typed(v) if isinstance(v, dict) else v) for k, v in d.items()}


def test_every_builtin_augmentation_is_registered_with_its_historic_defaults():
    assert AUGMENTATIONS.names() == sorted(HISTORIC_DEFAULTS)
    for entry in AUGMENTATIONS:
        node = OmegaConf.to_container(OmegaConf.structured(entry.config))  # what the config group holds
        assert _typed(node) == _typed(HISTORIC_DEFAULTS[entry.name]), entry.name
        assert _typed(augmentation_options({"name": entry.name})) == _typed(HISTORIC_DEFAULTS[entry.name])
        assert entry.obj.name == entry.name


@pytest.mark.parametrize(
    "name,cls", [("noaug", Augmentation), ("ada", ADA), ("apa", APA), ("diffaugment", DiffAugment)]
)
@pytest.mark.parametrize("form", ["dataclass", "DictConfig", "mapping"])
def test_registered_configs_build_their_augmentation(name, cls, form):
    schema = AUGMENTATIONS.get(name).config
    cfg = {"dataclass": schema(), "DictConfig": OmegaConf.structured(schema), "mapping": {"name": name}}[form]
    aug = build_augmentation(cfg)
    assert type(aug) is cls and aug.name == name
    if name in ("ada", "apa"):
        assert aug.adaptive and aug.probability == 0.0
        assert (aug.controller.target, aug.controller.interval, aug.controller.speed_kimg) == (0.6, 4, 500.0)
    if name == "ada":
        assert aug.pipeline == "bgcfnc"
        assert all(getattr(aug.pipe, k) == 1.0 for k in MULTIPLIERS)
    if name == "diffaugment":
        assert aug.policy == ("color", "translation", "cutout")


def test_pipeline_policy_and_strength_overrides_are_taken_from_cfg():
    ada = build_augmentation({"name": "ada", "pipeline": "bgcfn", "strengths": {"rotate": 0.5}})
    assert ada.pipe.cutout == 0 and ada.pipe.noise == 1 and ada.pipe.rotate == 0.5
    fixed = build_augmentation({"name": "ada", "p": 0.3, "adaptive": False})
    assert fixed.controller is None and fixed.probability == pytest.approx(0.3)
    da = build_augmentation({"name": "diffaugment", "policy": ["color", "translation"]})
    assert da.policy == ("color", "translation")
    assert type(build_augmentation(None)) is Augmentation


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"name": "augmix"}, "ada, apa, diffaugment, noaug"),
        ({"name": "ada", "pipeline": "bgcx"}, "bgcfnc"),
        ({"name": "ada", "strengths": {"warp": 1}}, "xflip"),
        ({"name": "ada", "p": 1.5}, r"\[0, 1\]"),
        ({"name": "apa", "p": -0.1}, r"\[0, 1\]"),
        ({"name": "apa", "target": 2}, r"\[0, 1\]"),
        ({"name": "apa", "interval": 0}, "positive integer"),
        ({"name": "apa", "speed_kimg": 0}, "> 0"),
        ({"name": "apa", "adaptive": "yes"}, "true or false"),
        ({"name": "apa", "pipeline": "bgc"}, "valid keys"),
        ({"name": "diffaugment", "policy": "color,flip"}, "color, translation, cutout"),
        ({"name": "diffaugment", "policy": 3}, "comma-separated string or a list"),
        ({"name": "ada", "strengths": ["cutout"]}, "mapping like"),
    ],
)
def test_bad_configs_raise_config_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_augmentation(cfg)


def test_ada_runs_in_float32_under_autocast():
    aug = ADA(pipeline="bgcfnc", p=1.0, adaptive=False)
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = aug(x)
    assert y.dtype == torch.float32
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ada_on_gpu_matches_cpu_resampling_and_supports_r1():
    """CUDA: the warp agrees with the CPU one for the same matrices, and R1's double backward runs."""
    pipe = AugmentPipe(**{k: 1 for k in PIPELINES["bg"]})
    x = torch.randn(4, 3, 32, 32)
    g_inv = pipe._geometry(4, 32, 32, torch.tensor(1.0))
    y_cpu = pipe._warp(x, g_inv)
    y_gpu = pipe.to("cuda")._warp(x.cuda(), g_inv.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=0)
    aug = ADA(pipeline="bgcfnc", p=1.0, adaptive=False).cuda()
    disc = torch.nn.Conv2d(3, 1, 3).cuda()
    xi = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
    (r1,) = torch.autograd.grad(disc(aug(xi)).sum(), xi, create_graph=True)
    r1.square().sum().backward()
    assert torch.isfinite(disc.weight.grad).all() and disc.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# One file is enough for a new augmentation: this module registers one and trains with it.
@dataclass
class ToyNoiseConfig:
    """Gaussian noise of standard deviation ``sigma`` on every image D sees."""

    name: str = "toy_noise"
    sigma: float = 0.1  # standard deviation, in the [-1, 1] units of the images


class ToyNoise(Augmentation):
    """Registered by the fixture below (and removed after the test): a class and its config dataclass are all."""

    name = "toy_noise"
    calls = 0

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        if not sigma >= 0:
            raise ConfigError(f"augmentation.sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return images + self.sigma * torch.randn_like(images)


@pytest.fixture
def toy_augmentation():
    AUGMENTATIONS.register("toy_noise", config=ToyNoiseConfig)(ToyNoise)
    ToyNoise.calls = 0
    try:
        yield ToyNoise
    finally:
        AUGMENTATIONS.remove("toy_noise")


def test_an_augmentation_registered_in_one_file_trains(toy_augmentation, compose_cfg, one_cpu_thread):
    """The real training path (fingerprint, folder, LightningModule under Lightning's Trainer, checkpoint) with an
    augmentation that exists only in this test module."""
    from omegaconf import open_dict

    from fidmed.data.datamodule import build_dataset
    from fidmed.gan.module import StyleGAN2Module
    from fidmed.gan.train import train_or_reuse
    from fidmed.tracking import Tracker

    assert "toy_noise" in AUGMENTATIONS.names()
    assert augmentation_options({"name": "toy_noise"}) == {"name": "toy_noise", "sigma": 0.1}
    with pytest.raises(ConfigError, match="valid keys: sigma"):
        build_augmentation({"name": "toy_noise", "sigma2": 1})
    cfg = compose_cfg(["experiment=smoke", "logger=none", "schedule.kimg=0.024"])
    with open_dict(cfg):
        cfg.augmentation = OmegaConf.structured(ToyNoiseConfig(sigma=0.05))
    final = train_or_reuse(cfg, build_dataset(cfg.modality), Tracker())
    assert toy_augmentation.calls > 0  # D saw augmented images: the training loop used it
    assert torch.load(final, weights_only=True)["images_seen"] == 24
    assert final.parent.name.startswith("phantom-toy_noise-")
    recorded = json.loads((final.parent / "fingerprint.json").read_text())["augmentation"]
    assert recorded == {"name": "toy_noise", "sigma": 0.05}
    module = StyleGAN2Module.load_from_checkpoint(final.parent / "checkpoints" / "last.ckpt")
    assert type(module.augment) is toy_augmentation and module.augment.sigma == 0.05
