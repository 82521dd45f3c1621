"""From a modality config to batches: dataset factory, infinite DDP-aware sampler, training DataModule, and the
sequential batch iterator used to compute real-image statistics.

Training batches are uint8 ``[B, C, H, W]`` tensors (images only, no labels); the training step converts them to
``x = uint8 / 127.5 - 1``. The training loop counts images itself (kimg), so the training loader is infinite and
Lightning runs with ``max_steps``.

The sample order is a pure function of ``(seed, rank, world size)`` and a position; the training DataModule counts
the images it hands to training steps and keeps that position in every checkpoint, so a resumed run (even one
killed in the middle of an epoch, with batches already prefetched by the loader or its workers) continues with
exactly the images the uninterrupted run would have shown next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fidmed.data.folder import ArrayImageDataset, ImageFolderDataset
from fidmed.data.phantom import PhantomDataset
from fidmed.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATASET_KINDS = ("phantom", "folder")


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise ConfigError(
            f"modality {cfg.get('name', '?')!r} (kind {cfg.get('kind')!r}) needs `{key}`; "
            f"set modality.{key} in the config or on the command line."
        )
    return value


def build_dataset(modality_cfg: Mapping[str, Any]) -> ArrayImageDataset:
    """Dataset of a modality config (a dict or DictConfig; keys other than the dataset's are ignored).

    Keys: ``name``; ``kind`` = phantom | folder; ``resolution``; ``channels``; for phantom ``num_images`` and
    ``data_seed`` (``seed`` is accepted when ``data_seed`` is absent); for folder ``path`` and optionally ``cache`` /
    ``cache_dir`` (see :class:`ImageFolderDataset`) and ``path_hint`` (the command that creates a missing ``path``).
    """
    kind = modality_cfg.get("kind")
    name = modality_cfg.get("name")
    if kind == "phantom":
        channels = modality_cfg.get("channels")
        if channels not in (None, 1):
            raise ConfigError(f"phantom images are grey (1 channel); modality.channels is {channels!r}: set it to 1.")
        seed = modality_cfg.get("data_seed")
        seed = modality_cfg.get("seed") if seed is None else seed
        return PhantomDataset(
            num_images=_require(modality_cfg, "num_images"),
            resolution=_require(modality_cfg, "resolution"),
            seed=int(seed or 0),
            name=name or "phantom",
        )
    if kind == "folder":
        path = Path(str(_require(modality_cfg, "path"))).expanduser()
        hint = modality_cfg.get("path_hint")
        if hint and not path.is_dir():
            raise DataError(
                f"modality {name!r}: the data folder {path} does not exist; prepare it with `{hint}` "
                f"(RAW = the downloaded dataset), or set modality.path to a prepared folder."
            )
        return ImageFolderDataset(
            str(path),
            resolution=modality_cfg.get("resolution"),
            channels=modality_cfg.get("channels"),
            name=name,
            cache=modality_cfg.get("cache") or "auto",
            cache_dir=modality_cfg.get("cache_dir"),
        )
    raise ConfigError(
        f"unknown dataset kind {kind!r} for modality {name!r}; modality.kind must be one of {', '.join(DATASET_KINDS)}."
    )


class XFlipDataset(Dataset):
    """Doubles a dataset with mirror images, as stylegan2-ada-pytorch's ``--mirror``: index ``i >= N`` is image
    ``i - N`` flipped left-right."""

    def __init__(self, base: ArrayImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return 2 * len(self.base)

    def __getitem__(self, index: int) -> torch.Tensor:
        n = len(self.base)
        if not 0 <= index < 2 * n:
            raise IndexError(f"index {index} out of range for {2 * n} images (x-flipped)")
        if index < n:
            return self.base[index]
        return self.base[index - n].flip(-1)


class InfiniteSampler(DistributedSampler):
    """Endless, seeded, rank-sharded sample order: epoch ``e`` is a permutation drawn from ``(seed, e)``;
    rank ``r`` of ``world_size`` takes its positions ``r, r + world_size, ...``, so within an epoch the ranks'
    shards are disjoint and together cover every index exactly once (no padding duplicates).

    A ``DistributedSampler`` subclass only so that Lightning recognises it as already distributed and does not
    wrap it; ``set_epoch`` is ignored (epochs are internal). It has no length. ``start`` skips that many samples
    of this rank's stream (to resume).
    """

    def __init__(
        self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, start: int = 0
    ) -> None:
        if size < 1:
            raise ConfigError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if size < world_size:
            raise ConfigError(f"{size} images cannot be sharded across {world_size} ranks; use more images")
        # Explicit rank/world size: the base class then needs no process group. Our own fields follow.
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.size, self.world_size, self.start = size, world_size, start

    def __len__(self) -> int:
        raise TypeError("InfiniteSampler has no length")

    def set_epoch(self, epoch: int) -> None:  # noqa: D102 - see class docstring
        pass

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices of the whole epoch ``epoch`` (all ranks), before sharding."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = 0, self.start
        while True:
            shard = self.epoch_order(epoch)[self.rank :: self.world_size]
            if skip >= len(shard):
                skip -= len(shard)
            else:
                yield from shard[skip:].tolist()
                skip = 0
            epoch += 1


class ImageDataModule(lightning.LightningDataModule):
    """Training batches of uint8 ``[B, C, H, W]`` images, sampled endlessly.

    Args:
        dataset_or_cfg: a dataset, or a modality config for :func:`build_dataset` (built in :meth:`setup`).
        batch_size: images per batch on each rank.
        num_workers: DataLoader worker processes.
        xflip: double the dataset with left-right mirrored images.
        seed: sampler seed; each rank gets a disjoint shard of every epoch's permutation.
        rank, world_size: override the values taken from the attached trainer (for tests and custom launchers).
        start: samples of this rank's stream to skip (resuming).

    ``position`` counts the samples of this rank's stream handed to training steps (``start`` plus one batch per
    step; batches the loader prefetched but no step used do not count). ``state_dict`` saves it with every
    checkpoint and ``load_state_dict`` makes it the ``start`` of the resumed loader. Every rank takes the same
    number of images per step, so rank 0's position (the one Lightning writes) is every rank's.
    """

    def __init__(
        self,
        dataset_or_cfg: ArrayImageDataset | Mapping[str, Any],
        batch_size: int,
        num_workers: int = 0,
        xflip: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self._source = dataset_or_cfg
        self.dataset: ArrayImageDataset | None = None
        if isinstance(dataset_or_cfg, Dataset):
            self.dataset = dataset_or_cfg  # type: ignore[assignment]
        self.batch_size, self.num_workers, self.xflip, self.seed = batch_size, num_workers, xflip, seed
        self._rank, self._world_size, self.start = rank, world_size, start
        self.position = start

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = build_dataset(self._source)  # type: ignore[arg-type]

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def train_dataset(self) -> Dataset:
        """The dataset the sampler indexes (x-flip doubled when enabled)."""
        self.setup()
        assert self.dataset is not None
        return XFlipDataset(self.dataset) if self.xflip else self.dataset

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        self.position = self.start
        sampler = InfiniteSampler(
            len(dataset), rank=self.rank, world_size=self.world_size, seed=self.seed, start=self.start
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for the batch a training step is about to use (not for prefetched ones).
        if self.trainer is not None and self.trainer.training:
            self.position += int(batch.shape[0])
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's sample stream stands, and what defines the stream."""
        return {
            "seed": int(self.seed),
            "xflip": bool(self.xflip),
            "world_size": int(self.world_size),
            "batch_size": int(self.batch_size),
            "position": int(self.position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the sample stream at the saved position (``start``).

        The same seed, x-flip and world size continue the identical stream. With another world size the ranks'
        streams are other interleavings of the same epochs, so the resumed run starts at the same number of
        images per rank into its own stream (the same point of training, not the same images) and says so.
        """
        position = int(state["position"])
        if int(state["world_size"]) != int(self.world_size):
            position = position * int(state["world_size"]) // int(self.world_size)
            log.warning(
                "the checkpoint's data order was drawn for %d DDP rank(s), this run has %d: the real "
                "images continue at the same point of training but in another order.",
                state["world_size"],
                self.world_size,
            )
        if int(state["seed"]) != int(self.seed) or bool(state["xflip"]) != bool(self.xflip):
            log.warning(
                "the checkpoint's data order used seed=%s xflip=%s, this run seed=%s xflip=%s: the real "
                "images are shown in another order than in the run it resumes.",
                state["seed"],
                state["xflip"],
                self.seed,
                self.xflip,
            )
        self.start = self.position = position


def iter_batches(
    dataset: ArrayImageDataset, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential, unshuffled, unflipped batches ``(indices int64 [B], images uint8 [B, C, H, W])``.

    With ``world_size > 1`` rank ``r`` gets indices ``r, r + world_size, ...``: the ranks' shards are disjoint and
    cover the dataset exactly once (the last batch may be short; nothing is padded or duplicated).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    indices = np.arange(rank, len(dataset), world_size, dtype=np.int64)
    for begin in range(0, len(indices), batch_size):
        chunk = indices[begin : begin + batch_size]
        if isinstance(dataset, ArrayImageDataset):
            images = dataset.get_batch(chunk)
        else:
            images = np.stack([np.asarray(dataset[int(i)]) for i in chunk])
        yield torch.from_numpy(chunk), torch.from_numpy(images)
