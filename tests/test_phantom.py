"""Procedural phantom modality: determinism, resolution rules, realism of the distribution, manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from fidmed.data.phantom import GENERATOR_VERSION, PhantomDataset, render_phantom, render_phantoms
from fidmed.errors import ConfigError


def test_same_seed_and_index_give_same_bytes() -> None:
    a = render_phantom(7, 32, seed=3)
    b = render_phantom(7, 32, seed=3)
    assert a.dtype == np.uint8 and a.shape == (32, 32)
    assert a.tobytes() == b.tobytes()


def test_image_does_not_depend_on_what_else_is_rendered_or_order() -> None:
    batch = render_phantoms(6, 32, seed=5, start=4)
    assert batch.shape == (6, 1, 32, 32) and batch.dtype == np.uint8
    # Rendered one by one, in reverse order, after rendering unrelated images.
    render_phantoms(3, 64, seed=11)
    singles = {i: render_phantom(i, 32, seed=5) for i in reversed(range(4, 10))}
    for row, index in enumerate(range(4, 10)):
        np.testing.assert_array_equal(batch[row, 0], singles[index])


def test_worker_processes_give_the_same_images() -> None:
    serial = render_phantoms(8, 16, seed=2, start=1)
    parallel = render_phantoms(8, 16, seed=2, start=1, num_workers=2)
    np.testing.assert_array_equal(serial, parallel)


def test_different_seeds_and_indices_differ() -> None:
    a = render_phantoms(8, 32, seed=0).astype(np.int16)
    b = render_phantoms(8, 32, seed=1).astype(np.int16)
    assert all(np.abs(a[i] - b[i]).mean() > 3 for i in range(8))
    assert np.abs(a[0] - a[1]).mean() > 3


@pytest.mark.parametrize("resolution", [0, 4, 12, 48, 100, 2048, 64.0, True, "64"])
def test_resolution_must_be_power_of_two_in_range(resolution: object) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        render_phantom(0, resolution)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="power of two"):
        PhantomDataset(4, resolution)  # type: ignore[arg-type]


@pytest.mark.parametrize("resolution", [8, 16, 1024])
def test_extreme_resolutions_render(resolution: int) -> None:
    image = render_phantom(0, resolution)
    assert image.shape == (resolution, resolution)
    assert image.std() > 10  # an actual picture, not a constant


def test_set_is_a_real_distribution_spanning_the_range() -> None:
    x = render_phantoms(64, 32, seed=0)[:, 0].astype(np.float64)
    # Thresholds are about half of what was measured on this set when written (seed 0, 64 images, 32x32):
    # per-pixel std across images >= 16.9 in the central 16x16, median pairwise mean |difference| 21.5,
    # 0.1th percentile 0, 99.9th percentile 212. Pixel noise alone (sigma <= 6) would give a pairwise
    # mean |difference| below 2 * 6 * 0.8 = 9.6.
    assert x.std(axis=0)[8:24, 8:24].min() > 8
    distances = np.abs(x[:, None] - x[None]).mean(axis=(2, 3))
    pairs = distances[np.triu_indices(len(x), k=1)]
    assert np.median(pairs) > 12
    assert pairs.min() > 3  # no two phantoms the same
    assert np.percentile(x, 0.1) <= 5  # air is black
    assert np.percentile(x, 99.9) >= 180  # bone/contrast is bright
    assert len(np.unique(x)) > 150


def test_same_anatomy_at_every_resolution() -> None:
    def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
        h, w = image.shape
        return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))

    for index in range(3):
        high = box_downsample(render_phantom(index, 128).astype(np.float64), 4)
        low = render_phantom(index, 32).astype(np.float64)
        other = render_phantom(index + 10, 32).astype(np.float64)
        # Measured when written: 3.1-5.1 for the same anatomy vs 20-27 for another image.
        assert np.abs(high - low).mean() < 0.5 * np.abs(high - other).mean()


def test_dataset_items_and_manifest() -> None:
    dataset = PhantomDataset(5, 16, seed=9, name="ph")
    assert len(dataset) == 5 and dataset.resolution == 16 and dataset.num_channels == 1 and dataset.name == "ph"
    item = dataset[3]
    assert item.dtype == torch.uint8 and item.shape == (1, 16, 16)
    np.testing.assert_array_equal(item[0].numpy(), render_phantom(3, 16, seed=9))
    assert dataset[-1].equal(dataset[4])
    with pytest.raises(IndexError):
        dataset[5]

    manifest = dataset.manifest()
    assert manifest["kind"] == "phantom" and manifest["count"] == 5 and manifest["seed"] == 9
    assert manifest["generator_version"] == GENERATOR_VERSION and manifest["resolution"] == 16
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert dataset.manifest_hash() == hashlib.sha256(canonical).hexdigest()

    hashes = {
        PhantomDataset(5, 16, seed=9, name="other").manifest_hash(),  # the name is not part of it
        dataset.manifest_hash(),
    }
    assert len(hashes) == 1
    for changed in (PhantomDataset(5, 16, seed=8), PhantomDataset(4, 16, seed=9), PhantomDataset(5, 32, seed=9)):
        assert changed.manifest_hash() != dataset.manifest_hash()


def test_bad_counts_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        PhantomDataset(0, 16)
    with pytest.raises(ConfigError):
        render_phantom(-1, 16)
