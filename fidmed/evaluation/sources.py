"""Image sources for evaluation: uint8 batches exactly as the study's images were on disk.

Generated images are quantised as stylegan2-ada-pytorch's ``generate.py`` saves them:
``uint8 = clamp(x * 127.5 + 128, 0, 255)`` followed by a cast that truncates (no rounding). Latents come from
``np.random.RandomState(seed).randn(z_dim)`` per seed, as ``generate.py --seeds`` draws them, so image ``k`` of
an evaluation is the image the study would have written for seed ``k``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

QUANTISATION = "uint8=trunc(clamp(x*127.5+128,0,255)) as stylegan2-ada-pytorch generate.py"


@runtime_checkable
class ImageSource(Protocol):
    """What the evaluator reads: ``len(source)`` images as uint8 NCHW batches, and a description of where they come
    from (recorded in every number's protocol). :class:`GeneratorSource` and :class:`DatasetSource` are the two
    kinds fidmed has."""

    @property
    def description(self) -> dict[str, Any]: ...

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]: ...


def quantize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] (NCHW float) to uint8 exactly as a saved PNG would hold it."""
    return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def latents_for_seeds(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """Float32 latents, one per seed, drawn as ``generate.py`` does."""
    z = np.stack([np.random.RandomState(int(s)).randn(z_dim) for s in seeds])
    return torch.from_numpy(z).to(torch.float32)


@dataclass
class GeneratorSource:
    """``num`` images from ``G`` for seeds ``seed_start, seed_start+1, ...``."""

    G: torch.nn.Module
    num: int
    seed_start: int = 0
    truncation_psi: float = 1.0
    noise_mode: str = "const"
    device: torch.device | str = "cpu"
    provenance: dict | None = None  # where G came from (file, fingerprint, pickle sha256): recorded with numbers

    @property
    def description(self) -> dict:
        return {
            "kind": "generator",
            "seeds": f"{self.seed_start}-{self.seed_start + self.num - 1}",
            "truncation_psi": self.truncation_psi,
            "noise_mode": self.noise_mode,
            "quantisation": QUANTISATION,
            "generator": self.provenance,
        }

    def __len__(self) -> int:
        return self.num

    def batches(
        self, batch_size: int, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yields (indices, uint8 NCHW on CPU). ``indices`` selects a subset (e.g. one rank's shard)."""
        idx = np.arange(self.num) if indices is None else np.asarray(indices)
        c_dim = int(getattr(self.G, "c_dim", 0))
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            z = latents_for_seeds(self.seed_start + chunk, self.G.z_dim).to(self.device)
            c = torch.zeros([len(chunk), c_dim], device=self.device)
            with torch.no_grad():
                img = self.G(z, c, truncation_psi=self.truncation_psi, noise_mode=self.noise_mode)
            yield chunk, quantize_to_uint8(img).cpu()


@dataclass
class DatasetSource:
    """Images of a dataset (``__getitem__`` returns uint8 CHW), the first ``num`` of them by index."""

    dataset: torch.utils.data.Dataset
    num: int | None = None

    def __post_init__(self) -> None:
        total = len(self.dataset)
        if self.num is None:
            self.num = total
        elif int(self.num) > total:
            from fidmed.errors import DataError

            raise DataError(
                f"{int(self.num)} images were requested from "
                f"{getattr(self.dataset, 'name', type(self.dataset).__name__)} but it holds only {total}; "
                f"lower the number requested (--num-gen/--num-real, eval.num_real) or add images."
            )

    @property
    def description(self) -> dict:
        manifest_hash = getattr(self.dataset, "manifest_hash", None)
        return {
            "kind": "dataset",
            "name": getattr(self.dataset, "name", type(self.dataset).__name__),
            "manifest_sha256": manifest_hash() if callable(manifest_hash) else None,
            "num": self.num,
        }

    def __len__(self) -> int:
        return int(self.num)

    def batches(
        self, batch_size: int, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        # fidmed's datasets read a whole batch at once (from their array, or decoding files in threads)
        get_batch = getattr(self.dataset, "get_batch", None)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            if callable(get_batch):
                batch = torch.from_numpy(np.ascontiguousarray(get_batch(chunk)))
            else:
                batch = torch.stack([torch.as_tensor(self.dataset[int(i)]) for i in chunk])
            if batch.dtype != torch.uint8:
                raise TypeError(f"dataset {type(self.dataset).__name__} returned {batch.dtype}, expected uint8")
            yield chunk, batch
