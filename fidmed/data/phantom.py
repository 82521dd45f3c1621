"""Procedural CT-like phantoms: the built-in modality that needs no download.

Each image is an axial slice through a synthetic torso, displayed as in radiology (anterior up, the patient's
right on the image's left): a body outline with skin, subcutaneous fat and a muscle wall, then the organs of a
randomly drawn slice level, from the upper thorax (lungs with vessels, heart) through the upper abdomen (liver,
spleen, stomach with an air pocket) to the lower abdomen (kidneys, bowel loops with fluid, contrast or gas),
always with a vertebra, aorta and vena cava; ribs and the scanner table vary too. A smooth texture, a bias
field, a window (contrast/brightness) jitter and Gaussian noise complete it.

Determinism: image ``i`` of ``seed`` depends only on ``(seed, i, resolution)``; its parameters come from
``np.random.default_rng([seed, i])``. All anatomy is drawn before the pixel noise and lives in normalised
coordinates ([-1, 1] across the image), so the same anatomy appears at every resolution; only the noise
differs. Edges are anti-aliased (a soft edge about one pixel wide), so small resolutions show partial-volume
blur rather than jagged shapes.

Bump ``GENERATOR_VERSION`` whenever the rendered pixels change: it is part of the manifest that keys cached
real statistics.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fidmed.data.folder import ArrayImageDataset
from fidmed.errors import ConfigError

GENERATOR_VERSION = "phantom-ct-1"
MIN_RESOLUTION = 8
MAX_RESOLUTION = 1024


def check_resolution(resolution: int) -> int:
    """Return ``resolution`` if it is a power of two in [8, 1024], else raise ConfigError."""
    valid = (
        isinstance(resolution, (int, np.integer))
        and not isinstance(resolution, bool)
        and MIN_RESOLUTION <= resolution <= MAX_RESOLUTION
        and resolution & (resolution - 1) == 0
    )
    if not valid:
        raise ConfigError(
            f"phantom resolution must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION} "
            f"(8, 16, ..., 1024), got {resolution!r}; set modality.resolution accordingly."
        )
    return int(resolution)


# ---------------------------------------------------------------------------------------------------------------
# Anatomy: a list of painted layers, drawn from the per-image generator, independent of resolution.


@dataclass(slots=True)
class Blob:
    """A star-shaped region: an ellipse (centre, semi-axes, rotation) whose radius is modulated by harmonics.

    Boundary in the ellipse's own polar coordinates: ``rho(theta) = 1 + sum_k amp_k cos(k theta + phase_k)``,
    with k = 2, 3, ... for successive entries of ``amps``.
    """

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    amps: tuple[float, ...] = ()
    phases: tuple[float, ...] = ()


@dataclass(slots=True)
class Layer:
    """Paint ``value + texture * texture_field`` over ``blob``, blended by its soft mask."""

    blob: Blob
    value: float
    texture: float = 0.0


@dataclass(frozen=True)
class Anatomy:
    """Everything that defines one phantom apart from its pixel noise."""

    layers: tuple[Layer, ...]
    texture_freqs: np.ndarray  # [K, 2] cycles per unit of normalised coordinate (x, y)
    texture_phases: np.ndarray  # [K]
    bias: tuple[float, float, float]  # linear x, linear y, quadratic radial coefficients
    contrast: float
    brightness: float
    noise_sigma: float


class _BodyFrame:
    """Maps body-relative coordinates (units of the body's semi-axes, y = posterior) to image coordinates."""

    def __init__(self, cx: float, cy: float, a: float, b: float, angle: float) -> None:
        self.cx, self.cy, self.a, self.b, self.angle = cx, cy, a, b, angle
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def point(self, u: float, v: float) -> tuple[float, float]:
        x, y = u * self.a, v * self.b
        return self.cx + self.cos * x - self.sin * y, self.cy + self.sin * x + self.cos * y

    def blob(
        self,
        u: float,
        v: float,
        a: float,
        b: float,
        angle: float = 0.0,
        amps: tuple[float, ...] = (),
        phases: tuple[float, ...] = (),
    ) -> Blob:
        """A blob centred at body coordinates (u, v) with semi-axes ``a``, ``b`` in image units."""
        cx, cy = self.point(u, v)
        return Blob(cx, cy, a, b, angle + self.angle, amps, phases)


class _Draws:
    """Scalar random draws served from blocks of uniforms of a numpy Generator.

    Same stream for the same generator state; about ten times cheaper per scalar than calling the Generator,
    which matters with ~150 draws per image.
    """

    _BLOCK = 256

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._block: list[float] = []
        self._next = 0

    def u(self, low: float, high: float) -> float:
        """Uniform in [low, high)."""
        if self._next == len(self._block):
            self._block = self.rng.random(self._BLOCK).tolist()
            self._next = 0
        value = self._block[self._next]
        self._next += 1
        return low + (high - low) * value

    def normal(self, mean: float, std: float) -> float:
        """Gaussian by the Box-Muller transform."""
        radius = math.sqrt(-2.0 * math.log(1.0 - self.u(0.0, 1.0)))
        return mean + std * radius * math.cos(self.u(0.0, 2.0 * math.pi))

    def integers(self, low: int, high: int) -> int:
        """Integer in [low, high)."""
        return min(high - 1, low + int(self.u(0.0, high - low)))

    def poisson(self, lam: float) -> int:
        """Poisson by inversion of the CDF (fine for the small means used here)."""
        target, k, p = self.u(0.0, 1.0), 0, math.exp(-lam)
        cdf = p
        while target > cdf and k < 1000:
            k += 1
            p *= lam / k
            cdf += p
        return k

    def wobble(self, strength: float, n: int = 3) -> dict[str, tuple[float, ...]]:
        """Random boundary harmonics (k = 2..n+1) with amplitudes decreasing with k."""
        amps = tuple(strength * self.u(0.3, 1.0) / (k + 1) for k in range(1, n + 1))
        phases = tuple(self.u(0.0, 2 * math.pi) for _ in range(n))
        return {"amps": amps, "phases": phases}


def _bump(s: float, centre: float, half_width: float) -> float:
    """Smooth bump in [0, 1]: 1 at ``centre``, 0 beyond ``half_width`` (a raised cosine)."""
    t = abs(s - centre) / half_width
    return 0.5 * (1 + math.cos(math.pi * t)) if t < 1 else 0.0


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one slice's anatomy. Values are 8-bit display intensities of a soft-tissue-like window."""
    d = _Draws(rng)
    u = d.u
    layers: list[Layer] = []

    def add(blob: Blob, value: float, texture: float = 0.0) -> None:
        layers.append(Layer(blob, float(value), float(texture)))

    level = u(0.0, 1.0)  # 0: upper thorax ... 1: lower abdomen
    thorax = _bump(level, 0.0, 0.62)
    liver_size = _bump(level, 0.55, 0.35)
    kidney_size = _bump(level, 0.85, 0.3)
    bowel_amount = min(1.0, max(0.0, (level - 0.5) / 0.35))
    obese = u(0.0, 1.0)

    # Body outline: skin, subcutaneous fat, muscle wall, visceral cavity.
    a = u(0.76, 0.9)
    b = a * u(0.66, 0.8) * (1.0 + 0.08 * thorax)
    body = _BodyFrame(d.normal(0, 0.03), d.normal(-0.04, 0.03), a, b, d.normal(0, math.radians(3)))
    outline = d.wobble(0.12)
    # Display values follow a soft-tissue window (W400/L40): fat ~ 40, water ~ 100, muscle ~ 130, bone 230+.
    fat = u(35, 60)
    muscle = u(118, 135)
    add(body.blob(0, 0, a, b, **outline), u(115, 135))  # skin
    skin = 0.012
    add(body.blob(0, 0, a - skin, b - skin, **outline), fat, 6)
    fat_depth = 0.03 + 0.1 * obese
    wall = u(0.025, 0.05)
    add(body.blob(0, 0.02, a - fat_depth, b - fat_depth * 1.2, **outline), muscle, 5)
    cavity_a, cavity_b = a - fat_depth - wall, b - fat_depth * 1.2 - wall
    # Visceral cavity: soft tissue mottled with fat, fattier in obese abdomens.
    cavity_value = muscle - u(15, 35) - 30 * obese * (1 - thorax)
    add(body.blob(0, 0.04, cavity_a, cavity_b, **d.wobble(0.1)), cavity_value, 6)

    # Scanner table under the patient (a curved band), not in every dataset.
    if u(0, 1) < 0.7:
        top = body.cy + b + u(0.03, 0.08)
        add(Blob(0.0, top + 0.5, 1.6, 0.5), u(70, 110))
        add(Blob(0.0, top + 0.5 + 0.03, 1.6, 0.47), u(0, 8))

    # Paraspinal muscles, then the vertebra (body, cortex, canal, posterior elements).
    vb_r = u(0.06, 0.08)
    spine_v = 1.0 - (fat_depth + wall + 2.2 * vb_r + 0.1) / b  # vertebral-body centre, posterior
    canal_v = spine_v + (vb_r + 0.04) / b
    for side in (-1, 1):
        add(
            body.blob(
                side * 0.13,
                canal_v + 0.06 / b,
                u(0.07, 0.09),
                u(0.055, 0.07),
                angle=side * u(0.0, 0.4),
                **d.wobble(0.15),
            ),
            muscle + u(-4, 4),
            4,
        )
    bone = u(225, 255)
    add(body.blob(0, spine_v, vb_r * 1.05, vb_r), bone)
    add(body.blob(0, spine_v, vb_r * 0.82, vb_r * 0.78), bone - u(55, 85), 8)  # cancellous bone
    for side in (-1, 1):  # pedicles/laminae and transverse processes
        add(body.blob(side * 0.04 / a, canal_v, 0.018, 0.05, angle=side * 0.5), bone)
        add(body.blob(side * 0.11, canal_v - 0.02, 0.055, 0.014, angle=side * u(0.1, 0.4)), bone)
    add(body.blob(0, canal_v + 0.065 / b, 0.012, 0.045), bone)  # spinous process
    add(body.blob(0, canal_v, 0.032, 0.03), u(85, 100))  # spinal canal

    # Great vessels.
    vessel = u(165, 225)  # contrast-enhanced blood
    aorta_r = u(0.03, 0.042)
    add(body.blob(0.07, spine_v - (vb_r + aorta_r + 0.01) / b, aorta_r, aorta_r), vessel)
    add(body.blob(-0.1, spine_v - (vb_r + 0.05) / b, u(0.03, 0.045), u(0.02, 0.035)), vessel - 20)

    # Ribs around the periphery at thorax/upper abdomen levels.
    rib_count = int(round(8 * _bump(level, 0.2, 0.7)))
    for _ in range(rib_count):
        theta = u(0.15, math.pi - 0.15) * (1 if u(0, 1) < 0.5 else -1)  # anywhere but the midline
        radius = 1 - (fat_depth + wall * 0.5) / a
        add(
            body.blob(
                radius * math.cos(theta),
                radius * math.sin(theta),
                u(0.015, 0.03),
                u(0.01, 0.018),
                angle=theta + math.pi / 2,
            ),
            bone - u(0, 30),
        )

    # Lungs and heart.
    if thorax > 0.05:
        lung_v = -0.1 + 0.45 * (1 - thorax)  # bases sit posteriorly
        lung_value = u(0, 15)
        for side in (-1, 1):
            la = cavity_a * (0.2 + 0.25 * thorax) * u(0.9, 1.1)
            lb = cavity_b * (0.25 + 0.5 * thorax) * u(0.9, 1.1)
            lu = side * (0.52 - 0.1 * (1 - thorax))
            add(body.blob(lu, lung_v, la, lb, angle=-side * u(0.0, 0.3), **d.wobble(0.25)), lung_value, 4)
            for _ in range(d.integers(3, 9)):  # vessels inside the lung
                r, t = 0.6 * math.sqrt(u(0, 1)), u(0, 2 * math.pi)
                vu = lu + r * la * math.cos(t) / a
                vv = lung_v + r * lb * math.sin(t) / b
                size = u(0.006, 0.016)
                add(body.blob(vu, vv, size, size * u(0.7, 1.3)), u(60, 130))
        if thorax > 0.4:
            heart = cavity_a * 0.38 * thorax
            add(
                body.blob(0.12, -0.2, heart, heart * u(0.75, 0.95), angle=u(0.3, 0.7), **d.wobble(0.12)),
                muscle + u(-5, 10),
                4,
            )
            add(body.blob(0.14, -0.18, heart * 0.55, heart * 0.45, angle=u(0, 3)), vessel - 10, 4)

    # Bowel loops (before the solid abdominal organs, which overlap them).
    for _ in range(d.poisson(7 * bowel_amount)):
        r = u(0.035, 0.085)
        bu, bv = u(-0.65, 0.65), u(-0.6, 0.25)
        kind = u(0, 1)
        content = u(0, 10) if kind < 0.25 else (u(200, 250) if kind < 0.4 else u(90, 115))
        blob_kw = d.wobble(0.3)
        add(body.blob(bu, bv, r, r * u(0.6, 1.0), angle=u(0, math.pi), **blob_kw), muscle + 10)
        add(body.blob(bu, bv, r * 0.75, r * 0.75 * u(0.6, 1.0), angle=u(0, math.pi), **blob_kw), content, 4)

    # Liver (patient's right = image left), with vessels and sometimes the gallbladder.
    if liver_size > 0.05:
        la, lb = cavity_a * 0.42 * liver_size**0.5, cavity_b * 0.7 * liver_size**0.5
        lu, lv = -0.33 + 0.1 * (1 - liver_size), -0.05 + u(-0.05, 0.08)
        liver_value = muscle + u(0, 25)
        add(body.blob(lu, lv, la, lb, angle=u(-0.4, 0.1), **d.wobble(0.25)), liver_value, 8)
        for _ in range(d.integers(2, 7)):
            r, t = 0.55 * math.sqrt(u(0, 1)), u(0, 2 * math.pi)
            size = u(0.008, 0.022)
            add(
                body.blob(
                    lu + r * la * math.cos(t) / a, lv + r * lb * math.sin(t) / b, size, size * 1.4, angle=u(0, math.pi)
                ),
                liver_value + u(15, 35),
            )
        if u(0, 1) < 0.4 * liver_size:
            g = u(0.03, 0.06)
            add(body.blob(lu + 0.25, lv - 0.35 * lb / b, g * 1.3, g, angle=u(0, 1)), u(85, 105))

    # Stomach with an air-fluid level (air anterior in a supine patient) and the spleen.
    stomach = _bump(level, 0.5, 0.22)
    if stomach > 0.1:
        sa, sb = 0.17 * stomach, 0.13 * stomach
        su, sv = 0.3, -0.3
        add(body.blob(su, sv, sa, sb, angle=u(-0.5, 0.5), **d.wobble(0.25)), u(100, 120), 6)
        if u(0, 1) < 0.7:
            add(body.blob(su, sv - 0.6 * sb / b, sa * 0.7, sb * 0.35), u(0, 8))
    spleen = _bump(level, 0.5, 0.3)
    if spleen > 0.1:
        add(
            body.blob(0.58, 0.18, 0.16 * spleen, 0.09 * spleen, angle=u(0.9, 1.4), **d.wobble(0.3)),
            muscle + u(0, 20),
            5,
        )

    # Kidneys beside the spine, with a darker medial hilum.
    if kidney_size > 0.1:
        cortex = u(165, 220)
        for side in (-1, 1):
            ka, kb = 0.1 * kidney_size**0.5, 0.065 * kidney_size**0.5
            ku, kv = side * u(0.3, 0.38), spine_v - u(0.05, 0.2)
            add(body.blob(ku, kv, ka, kb, angle=side * u(0.8, 1.3), **d.wobble(0.1)), cortex, 4)
            add(body.blob(ku - side * 0.35 * ka / a, kv, ka * 0.4, kb * 0.5, angle=side * 1.0), u(90, 115))

    # Texture: plane waves of random direction, 4..16 cycles across the image.
    wave_count = 16
    angles = rng.uniform(0, math.pi, size=wave_count)
    cycles = rng.uniform(4.0, 16.0, size=wave_count) / 2.0  # per unit of normalised coordinate
    freqs = np.stack([np.cos(angles), np.sin(angles)], axis=1) * cycles[:, None]
    return Anatomy(
        layers=tuple(layers),
        texture_freqs=freqs,
        texture_phases=rng.uniform(0, 2 * math.pi, size=wave_count),
        bias=(u(-0.08, 0.08), u(-0.08, 0.08), u(-0.1, 0.05)),
        contrast=u(0.9, 1.12),
        brightness=u(-8, 4),
        noise_sigma=u(2.0, 6.0),
    )


# ---------------------------------------------------------------------------------------------------------------
# Rendering.


def _coords(resolution: int, pad: int = 0) -> np.ndarray:
    """Pixel-centre coordinates in normalised units ([-1, 1] across the image), ``pad`` extra pixels each side."""
    index = np.arange(-pad, resolution + pad, dtype=np.float64)
    return ((index + 0.5) * (2.0 / resolution) - 1.0).astype(np.float32)


def _reach(blob: Blob) -> float:
    """Radius (normalised units) of a circle around the blob's centre that contains it."""
    return max(blob.a, blob.b) * (1.0 + sum(abs(x) for x in blob.amps))


def _blob_masks(blobs: list[Blob], xs: np.ndarray, ys: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of each blob on its own pixel grid: ``[L, H, W]`` float32.

    ``xs`` ``[L, W]`` and ``ys`` ``[L, H]`` are the normalised pixel-centre coordinates of each blob's patch.
    Coverage ramps linearly over ``edge`` across the boundary, using (boundary - rho) * min semi-axis as the
    signed distance (exact for circles, close for the mild ellipses and harmonics used here).
    """
    count = len(blobs)
    orders = max(len(b.amps) for b in blobs)
    params = np.zeros((count, 7 + 2 * orders), dtype=np.float32)
    for row, b in enumerate(blobs):
        params[row, :7] = (b.cx, b.cy, math.cos(b.angle), math.sin(b.angle), 1.0 / b.a, 1.0 / b.b, min(b.a, b.b))
        params[row, 7 : 7 + len(b.amps)] = b.amps
        params[row, 7 + orders : 7 + orders + len(b.phases)] = b.phases
    params = params[:, :, None]  # columns broadcast along the patch axis
    cx, cy, cos, sin, inv_a, inv_b, semi_min = params[:, :7].transpose(1, 0, 2)  # each [L, 1]
    dx = xs - cx
    dy = ys - cy
    u = (dy * (sin * inv_a))[:, :, None] + (dx * (cos * inv_a))[:, None, :]
    v = (dy * (cos * inv_b))[:, :, None] - (dx * (sin * inv_b))[:, None, :]
    rho = u * u
    rho += v * v
    np.sqrt(rho, out=rho)  # (np.hypot is several times slower)
    sharp = (semi_min * np.float32(1.0 / edge))[:, :, None]
    # coverage = clip(sharp * (boundary - rho) + 0.5, 0, 1) with boundary = 1 + sum_k amp_k cos(k theta + phase_k)
    rho *= -sharp
    rho += sharp + np.float32(0.5)
    if orders:
        theta = np.arctan2(v, u)
        for k in range(orders):
            amp, phase = params[:, 7 + k, :, None], params[:, 7 + orders + k, :, None]
            wave = np.multiply(theta, np.float32(k + 2), out=u)
            wave += phase
            np.cos(wave, out=wave)
            wave *= amp * sharp
            rho += wave
    np.clip(rho, np.float32(0.0), np.float32(1.0), out=rho)
    return rho


def _texture(anatomy: Anatomy, coords: np.ndarray) -> np.ndarray:
    """Smooth random field with unit standard deviation: a sum of plane waves in normalised coordinates."""
    freqs = anatomy.texture_freqs.astype(np.float32) * np.float32(2 * math.pi)
    ax = np.multiply.outer(freqs[:, 0], coords)  # [K, W]
    by = np.multiply.outer(freqs[:, 1], coords) + anatomy.texture_phases.astype(np.float32)[:, None]  # [K, H]
    # sum_k cos(ax_k + by_k) = sum_k (cos by_k cos ax_k - sin by_k sin ax_k): two rank-K products. einsum's own
    # loop, not BLAS: tiny multi-threaded BLAS products were 40x slower on a busy machine.
    field = np.einsum("kh,kw->hw", np.cos(by), np.cos(ax)) - np.einsum("kh,kw->hw", np.sin(by), np.sin(ax))
    return field * np.float32(math.sqrt(2.0 / len(anatomy.texture_phases)))


def _blend(region: np.ndarray, mask: np.ndarray, layer: Layer, texture: np.ndarray) -> None:
    """region <- region + (layer value - region) * mask, in place."""
    if layer.texture:
        value = texture * np.float32(layer.texture)
        value += np.float32(layer.value)
        value -= region
    else:
        value = np.float32(layer.value) - region
    value *= mask
    region += value


def _render(anatomy: Anatomy, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Paint the layers on a canvas with a margin, add bias, window and noise; return uint8 ``[H, W]``.

    Small layers (most of them: vessels, bones, bowel) get their masks computed together on equal-size patches
    in one vectorised call; large ones get a mask over their clipped bounding box. Painting keeps layer order.
    """
    edge = 2.0 / resolution  # one pixel in normalised units: the anti-aliasing ramp
    scale = resolution / 2.0  # pixels per normalised unit
    pad = max(4, resolution // 8)  # canvas margin = the largest patch of a batched layer
    coords = _coords(resolution, pad)
    size = resolution + 2 * pad
    canvas = np.zeros((size, size), dtype=np.float32)
    texture = _texture(anatomy, coords)

    # Pixel box [x0, x1) x [y0, y1) of each layer on the canvas.
    boxes = []
    for layer in anatomy.layers:
        blob, reach = layer.blob, _reach(layer.blob) + edge
        boxes.append(
            (
                int(math.floor((blob.cx - reach + 1.0) * scale)) + pad,
                int(math.ceil((blob.cx + reach + 1.0) * scale)) + pad,
                int(math.floor((blob.cy - reach + 1.0) * scale)) + pad,
                int(math.ceil((blob.cy + reach + 1.0) * scale)) + pad,
            )
        )
    patch = max([0] + [max(x1 - x0, y1 - y0) for x0, x1, y0, y1 in boxes if max(x1 - x0, y1 - y0) <= pad])
    batched = [
        i
        for i, (x0, x1, y0, y1) in enumerate(boxes)
        if max(x1 - x0, y1 - y0) <= pad and 0 <= x0 and x0 + patch <= size and 0 <= y0 and y0 + patch <= size
    ]
    masks: dict[int, np.ndarray] = {}
    if batched:
        offsets = np.arange(patch)
        xs = coords[np.array([boxes[i][0] for i in batched])[:, None] + offsets]
        ys = coords[np.array([boxes[i][2] for i in batched])[:, None] + offsets]
        stacked = _blob_masks([anatomy.layers[i].blob for i in batched], xs, ys, edge)
        masks = {i: stacked[row] for row, i in enumerate(batched)}

    for i, layer in enumerate(anatomy.layers):
        x0, x1, y0, y1 = boxes[i]
        if i in masks:
            x1, y1 = x0 + patch, y0 + patch
            mask = masks[i]
        else:
            x0, x1 = max(x0, pad), min(x1, pad + resolution)  # only the visible part
            y0, y1 = max(y0, pad), min(y1, pad + resolution)
            if x0 >= x1 or y0 >= y1:
                continue
            mask = _blob_masks([layer.blob], coords[None, x0:x1], coords[None, y0:y1], edge)[0]
        _blend(canvas[y0:y1, x0:x1], mask, layer, texture[y0:y1, x0:x1])

    image = canvas[pad : pad + resolution, pad : pad + resolution]
    xy = coords[pad : pad + resolution]
    bx, by, br = anatomy.bias
    bias = 1.0 + bx * xy[None, :] + by * xy[:, None] + br * (xy[None, :] ** 2 + xy[:, None] ** 2)
    image = image * bias.astype(np.float32)
    image = image * np.float32(anatomy.contrast) + np.float32(anatomy.brightness)  # window jitter; air stays ~0
    image += np.float32(anatomy.noise_sigma) * rng.standard_normal((resolution, resolution), dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_phantom(index: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Phantom ``index`` of ``seed`` as uint8 ``[H, W]``; depends only on ``(seed, index, resolution)``."""
    resolution = check_resolution(resolution)
    if index < 0 or seed < 0:
        raise ConfigError(f"phantom index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([int(seed), int(index)])
    anatomy = sample_anatomy(rng)  # all anatomy first: the noise draws below then cannot shift it
    return _render(anatomy, resolution, rng)


def _render_range(start: int, stop: int, resolution: int, seed: int) -> np.ndarray:
    out = np.empty((stop - start, 1, resolution, resolution), dtype=np.uint8)
    for row, index in enumerate(range(start, stop)):
        out[row, 0] = render_phantom(index, resolution, seed)
    return out


def render_phantoms(n: int, resolution: int, seed: int = 0, start: int = 0, num_workers: int = 0) -> np.ndarray:
    """Phantoms ``start .. start+n-1`` as uint8 ``[n, 1, H, W]``; ``num_workers > 0`` renders in processes."""
    resolution = check_resolution(resolution)
    if n < 0:
        raise ConfigError(f"number of phantoms must be non-negative, got {n}")
    if num_workers <= 0 or n < 2:
        return _render_range(start, start + n, resolution, seed)
    chunks = min(n, num_workers * 4)
    bounds = [start + (n * k) // chunks for k in range(chunks + 1)]
    with ProcessPoolExecutor(num_workers) as pool:
        parts = list(pool.map(_render_range, bounds[:-1], bounds[1:], [resolution] * chunks, [seed] * chunks))
    return np.concatenate(parts, axis=0)


class PhantomDataset(ArrayImageDataset):
    """``num_images`` phantoms rendered once at construction; items are ``torch.uint8 [1, H, W]``."""

    def __init__(
        self, num_images: int, resolution: int, seed: int = 0, name: str = "phantom", num_workers: int = 0
    ) -> None:
        self.resolution = check_resolution(resolution)
        if not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ConfigError(f"phantom num_images must be a positive integer, got {num_images!r}")
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.name = name
        self.num_channels = 1
        self._array = render_phantoms(self.num_images, self.resolution, self.seed, num_workers=num_workers)

    def __len__(self) -> int:
        return self.num_images

    def manifest(self) -> dict[str, Any]:
        """Everything that determines the pixels (the display ``name`` is left out on purpose)."""
        return {
            "kind": "phantom",
            "generator_version": GENERATOR_VERSION,
            "count": self.num_images,
            "resolution": self.resolution,
            "channels": 1,
            "seed": self.seed,
        }
