"""Image-folder dataset, dataset factory, infinite sampler, DataModule and evaluation batches."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fidmed.data.datamodule import ImageDataModule, InfiniteSampler, XFlipDataset, build_dataset, iter_batches
from fidmed.data.folder import ImageFolderDataset
from fidmed.data.phantom import PhantomDataset
from fidmed.errors import ConfigError, DataError

from helpers.training import cpu_trainer


def _grey(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)


def _write_grey_folder(root: Path, count: int = 5, size: int = 16) -> list[np.ndarray]:
    """Files b/..., a/... and top-level ones, so sorting by relative path is exercised; returns arrays in
    relative-path order."""
    names = [f"b/img{i}.png" if i % 2 else f"a/img{i}.png" for i in range(count)]
    arrays = {}
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        arrays[name] = _grey(i, size)
        PIL.Image.fromarray(arrays[name]).save(root / name)
    return [arrays[name] for name in sorted(names)]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, PIL's documented 'L' conversion: L = R*299/1000 + G*587/1000 + B*114/1000."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# -- folder dataset --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["memory", "none", "disk"])
def test_folder_loads_sorted_uint8(tmp_path: Path, cache: str) -> None:
    data = tmp_path / "data"
    expected = _write_grey_folder(data)
    (data / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(data, cache=cache, cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    assert len(dataset) == 5 and dataset.resolution == 16 and dataset.num_channels == 1
    assert dataset.name == "data"
    assert [f.relpath for f in dataset.files] == sorted(f.relpath for f in dataset.files)
    for i, array in enumerate(expected):
        item = dataset[i]
        assert item.dtype == torch.uint8 and item.shape == (1, 16, 16)
        np.testing.assert_array_equal(item[0].numpy(), array)
    if cache == "disk":
        assert dataset.cache_path == tmp_path / "cache" / f"{dataset.manifest_hash()}.npy"
        assert dataset.cache_path.is_file()
        again = ImageFolderDataset(data, cache="disk", cache_dir=tmp_path / "cache")
        assert isinstance(again._array, np.memmap)
        np.testing.assert_array_equal(again.get_batch(np.arange(5)), np.stack(expected)[:, None])


def test_rgb_and_channel_conversion(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    for i in range(2):
        PIL.Image.fromarray(rgb[i], "RGB").save(tmp_path / f"{i}.png")
    colour = ImageFolderDataset(tmp_path)
    assert colour.num_channels == 3 and colour[1].shape == (3, 8, 8)
    np.testing.assert_array_equal(colour[1].numpy(), rgb[1].transpose(2, 0, 1))
    grey = ImageFolderDataset(tmp_path, channels=1)
    assert grey.num_channels == 1
    assert np.abs(grey[0][0].numpy().astype(float) - _luma(rgb[0].astype(float))).max() <= 1.0


def test_grey_to_three_channels_copies(tmp_path: Path) -> None:
    expected = _write_grey_folder(tmp_path, count=2)
    dataset = ImageFolderDataset(tmp_path, channels=3)
    assert dataset[0].shape == (3, 16, 16)
    for c in range(3):
        np.testing.assert_array_equal(dataset[0][c].numpy(), expected[0])


def test_rgba_becomes_grey_as_in_study_xray_preparation(tmp_path: Path) -> None:
    grey = _grey(1, 8)
    PIL.Image.fromarray(grey).save(tmp_path / "a.png")
    rgba = np.random.default_rng(2).integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.num_channels == 1
    np.testing.assert_array_equal(dataset[0][0].numpy(), grey)
    # Alpha is ignored; colour becomes luma.
    assert np.abs(dataset[1][0].numpy().astype(float) - _luma(rgba[..., :3].astype(float))).max() <= 1.0


def test_jpeg_is_read(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    PIL.Image.fromarray(rgb).save(tmp_path / "x.JPG", quality=95)
    dataset = ImageFolderDataset(tmp_path)
    with PIL.Image.open(tmp_path / "x.JPG") as image:
        decoded = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(dataset[0].numpy(), decoded.transpose(2, 0, 1))


def test_16_bit_images_are_refused(tmp_path: Path) -> None:
    PIL.Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with PIL.Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")  # the premise: PIL reads it as a 16/32-bit mode
    for channels in (None, 1, 3):
        with pytest.raises(DataError, match="fidmed prepare") as info:
            ImageFolderDataset(tmp_path, channels=channels)
        assert "deep.png" in str(info.value)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        ImageFolderDataset(tmp_path / "nope")
    assert "nope" in str(info.value) and "fidmed prepare" in str(info.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no") as info:
        ImageFolderDataset(tmp_path / "empty")
    assert "fidmed prepare" in str(info.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    _write_grey_folder(tmp_path, count=2)
    (tmp_path / "a" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png") as info:
        ImageFolderDataset(tmp_path)
    assert "remove" in str(info.value)


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_truncated_file_is_named(tmp_path: Path, cache: str) -> None:
    _write_grey_folder(tmp_path, count=2)
    good = (tmp_path / "a" / "img0.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut off
    if cache == "memory":
        with pytest.raises(DataError, match="truncated.png"):
            ImageFolderDataset(tmp_path, cache="memory")
    else:
        dataset = ImageFolderDataset(tmp_path, cache="none")  # headers pass; decoding fails on access
        index = [f.relpath for f in dataset.files].index("a/truncated.png")
        with pytest.raises(DataError, match="truncated.png"):
            dataset[index]


def test_mixed_sizes_name_file_and_both_sizes(tmp_path: Path) -> None:
    _write_grey_folder(tmp_path, count=2, size=16)
    PIL.Image.fromarray(_grey(9, 8)).save(tmp_path / "c_small.png")
    with pytest.raises(DataError) as info:
        ImageFolderDataset(tmp_path)
    message = str(info.value)
    assert "c_small.png" in message and "16x16" in message and "8x8" in message


def test_resolution_mismatch_and_non_square(tmp_path: Path) -> None:
    _write_grey_folder(tmp_path, count=2, size=16)
    with pytest.raises(DataError, match="32x32"):
        ImageFolderDataset(tmp_path, resolution=32)
    assert ImageFolderDataset(tmp_path, resolution=16).resolution == 16
    other = tmp_path / "wide"
    other.mkdir()
    PIL.Image.fromarray(np.zeros((8, 16), dtype=np.uint8)).save(other / "w.png")
    with pytest.raises(DataError, match="square"):
        ImageFolderDataset(other)


def test_mixed_grey_and_colour_needs_channels(tmp_path: Path) -> None:
    PIL.Image.fromarray(_grey(0, 8)).save(tmp_path / "a.png")
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="channels"):
        ImageFolderDataset(tmp_path)
    assert ImageFolderDataset(tmp_path, channels=3).num_channels == 3


def test_manifest_hash_tracks_files(tmp_path: Path) -> None:
    _write_grey_folder(tmp_path, count=3)
    dataset = ImageFolderDataset(tmp_path)
    first = dataset.manifest_hash()
    canonical = json.dumps(dataset.manifest(), sort_keys=True, separators=(",", ":")).encode()
    assert first == hashlib.sha256(canonical).hexdigest()
    assert ImageFolderDataset(tmp_path, name="renamed").manifest_hash() == first  # unchanged folder, same hash
    assert ImageFolderDataset(tmp_path, channels=3).manifest_hash() != first

    target = tmp_path / "a" / "img0.png"
    stat = target.stat()
    PIL.Image.fromarray(_grey(99)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # even on coarse-mtime filesystems
    changed = ImageFolderDataset(tmp_path).manifest_hash()
    assert changed != first

    (tmp_path / "manifest.json").write_text(json.dumps({"modality": "ct", "slices": 3}))
    with_prepare = ImageFolderDataset(tmp_path)
    assert with_prepare.manifest()["prepare_manifest_sha256"] is not None
    assert with_prepare.manifest_hash() != changed
    (tmp_path / "manifest.json").write_text(json.dumps({"modality": "ct", "slices": 4}))
    assert ImageFolderDataset(tmp_path).manifest_hash() != with_prepare.manifest_hash()

    PIL.Image.fromarray(_grey(5)).save(tmp_path / "z.png")
    assert ImageFolderDataset(tmp_path).manifest_hash() not in (first, changed, with_prepare.manifest_hash())


# -- factory ------------------------------------------------------------------------------------------------------


def test_build_dataset_kinds(tmp_path: Path) -> None:
    phantom = build_dataset(
        {
            "name": "phantom",
            "kind": "phantom",
            "resolution": 16,
            "num_images": 4,
            "seed": 1,
            "channels": 1,
            "augment_pipe": "ignored",
        }
    )
    assert isinstance(phantom, PhantomDataset) and len(phantom) == 4 and phantom.seed == 1
    assert build_dataset({"kind": "phantom", "resolution": 8, "num_images": 2, "data_seed": 5}).seed == 5
    expected = _write_grey_folder(tmp_path, count=2)
    folder = build_dataset({"name": "ct", "kind": "folder", "path": str(tmp_path), "resolution": 16, "channels": None})
    assert isinstance(folder, ImageFolderDataset) and folder.name == "ct"
    np.testing.assert_array_equal(folder[0][0].numpy(), expected[0])


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "x", "kind": "zip", "resolution": 16}, "unknown dataset kind"),
        ({"name": "x", "resolution": 16}, "unknown dataset kind"),
        ({"name": "x", "kind": "folder", "resolution": 16}, "path"),
        ({"name": "x", "kind": "phantom", "resolution": 16}, "num_images"),
        ({"name": "x", "kind": "phantom", "resolution": 16, "num_images": 4, "channels": 3}, "channels"),
        ({"name": "x", "kind": "phantom", "resolution": 24, "num_images": 4}, "power of two"),
    ],
)
def test_build_dataset_config_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_dataset(cfg)


def test_build_dataset_accepts_omegaconf() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"name": "p", "kind": "phantom", "resolution": 8, "num_images": 2, "seed": 0})
    assert len(build_dataset(cfg)) == 2


# -- sampler, x-flip, DataModule ------------------------------------------------------------------------------------


def _take(sampler: InfiniteSampler, count: int) -> list[int]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_sampler_epochs_are_seeded_permutations() -> None:
    n = 10
    stream = _take(InfiniteSampler(n, seed=3), 3 * n)
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # reshuffled each epoch
    assert _take(InfiniteSampler(n, seed=3), 3 * n) == stream
    assert _take(InfiniteSampler(n, seed=4), 3 * n) != stream
    assert _take(InfiniteSampler(n, seed=3, start=7), 20) == stream[7:27]
    with pytest.raises(TypeError):
        len(InfiniteSampler(n))


@pytest.mark.parametrize("n", [10, 11])
def test_sampler_shards_are_disjoint_and_cover_each_epoch(n: int) -> None:
    sizes = [len(range(rank, n, 2)) for rank in range(2)]
    streams = [_take(InfiniteSampler(n, rank=rank, world_size=2, seed=1), 3 * sizes[rank]) for rank in range(2)]
    for epoch in range(3):
        shards = [set(streams[r][epoch * sizes[r] : (epoch + 1) * sizes[r]]) for r in range(2)]
        assert len(shards[0]) == sizes[0] and len(shards[1]) == sizes[1]
        assert shards[0].isdisjoint(shards[1])
        assert shards[0] | shards[1] == set(range(n))


def test_sampler_rejects_bad_ranks() -> None:
    with pytest.raises(ConfigError):
        InfiniteSampler(10, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        InfiniteSampler(1, rank=0, world_size=2)


def test_xflip_mirrors() -> None:
    base = PhantomDataset(3, 16, seed=0)
    flipped = XFlipDataset(base)
    assert len(flipped) == 6
    for i in range(3):
        assert flipped[i].equal(base[i])
        np.testing.assert_array_equal(flipped[i + 3].numpy(), base[i].numpy()[:, :, ::-1])
    assert not flipped[3].equal(flipped[0])


def test_datamodule_batches_follow_the_sampler() -> None:
    base = PhantomDataset(6, 16, seed=0)
    module = ImageDataModule(base, batch_size=4, xflip=True, seed=7)
    module.setup("fit")
    loader = module.train_dataloader()
    assert loader.drop_last
    order = _take(InfiniteSampler(12, seed=7), 20)
    reference = np.concatenate([base.get_batch(np.arange(6)), base.get_batch(np.arange(6))[..., ::-1]])
    batches = iter(loader)
    for step in range(5):  # past the end of the first epoch: the loader is endless
        batch = next(batches)
        assert batch.dtype == torch.uint8 and batch.shape == (4, 1, 16, 16)
        np.testing.assert_array_equal(batch.numpy(), reference[order[4 * step : 4 * step + 4]])


def test_datamodule_from_config_and_rank_override() -> None:
    cfg = {"name": "p", "kind": "phantom", "resolution": 8, "num_images": 8, "seed": 0}
    seen = []
    for rank in range(2):
        module = ImageDataModule(cfg, batch_size=2, rank=rank, world_size=2, seed=1)
        module.setup("fit")
        assert module.dataset is not None and len(module.dataset) == 8
        sampler = module.train_dataloader().sampler
        assert isinstance(sampler, InfiniteSampler) and sampler.rank == rank and sampler.num_replicas == 2
        seen.append(set(_take(sampler, 4)))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))


def test_datamodule_runs_under_lightning_with_max_steps() -> None:
    import lightning

    class Recorder(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.shapes: list[tuple] = []

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.shapes.append((tuple(batch.shape), batch.dtype))
            return (self.weight * batch.float().mean()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = Recorder()
    trainer = cpu_trainer(5)
    module = ImageDataModule({"name": "p", "kind": "phantom", "resolution": 8, "num_images": 3}, batch_size=2)
    trainer.fit(model, datamodule=module)
    assert model.shapes == [((2, 1, 8, 8), torch.uint8)] * 5  # 5 steps from 3 images: the loader never ends


# -- evaluation batches ----------------------------------------------------------------------------------------------


def test_iter_batches_sequential(tmp_path: Path) -> None:
    expected = np.stack(_write_grey_folder(tmp_path, count=5))[:, None]
    dataset = ImageFolderDataset(tmp_path, cache="none")
    batches = list(iter_batches(dataset, batch_size=2))
    assert [len(indices) for indices, _ in batches] == [2, 2, 1]
    indices = torch.cat([i for i, _ in batches])
    images = torch.cat([b for _, b in batches])
    assert indices.tolist() == list(range(5)) and indices.dtype == torch.int64
    assert images.dtype == torch.uint8
    np.testing.assert_array_equal(images.numpy(), expected)

    shards = [torch.cat([i for i, _ in iter_batches(dataset, 2, rank=r, world_size=2)]).tolist() for r in range(2)]
    assert set(shards[0]).isdisjoint(shards[1]) and sorted(shards[0] + shards[1]) == list(range(5))
    for rank in range(2):
        for indices, batch in iter_batches(dataset, 2, rank=rank, world_size=2):
            np.testing.assert_array_equal(batch.numpy(), expected[indices.numpy()])
