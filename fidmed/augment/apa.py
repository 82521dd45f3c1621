"""Adaptive pseudo augmentation (APA; Jiang et al. 2021, "Deceive D: Adaptive Pseudo Augmentation for GAN
Training with Limited Data"; reference code EndlessSora/DeceiveD).

With probability ``p``, independently per image, a real image shown to the discriminator is replaced by a
generated image, detached from the generator's graph, so that D is "deceived" with fakes labelled real.
``p`` follows the ADA heuristic (:mod:`fidmed.augment.controller`) with target 0.6 (DeceiveD train.py
``--aug=apa``: ``apa_target = 0.6``).

As in DeceiveD's ``adaptive_pseudo_augmentation``, replacement happens wherever real images enter D (the D main
and the R1 phases), each image's draw is ``U(0, 1) < p``, and images pass through unchanged otherwise
(``with_dataaug=False``, the default, which the study used). One difference: DeceiveD reuses the batch G
generated in its last G step; fidmed asks the training loop for fresh fakes (``make_fake(n)``), and only for
as many as are replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fidmed.augment.base import AUGMENTATIONS
from fidmed.augment.controller import (
    DEFAULT_INTERVAL,
    DEFAULT_SPEED_KIMG,
    DEFAULT_TARGET,
    AdaptiveAugmentation,
    AdaptiveConfig,
)


@dataclass
class APAConfig(AdaptiveConfig):
    """Adaptive pseudo augmentation (DeceiveD, Jiang et al. 2021): with probability ``p`` per image, a real image
    shown to D is replaced by a detached generated image; ``p`` follows the ADA heuristic (DeceiveD ``--aug apa``)."""

    name: str = "apa"


@AUGMENTATIONS.register("apa", config=APAConfig)
class APA(AdaptiveAugmentation):
    """Adaptive pseudo augmentation: swap reals for detached fakes with probability ``p`` per image."""

    name = "apa"

    def __init__(
        self,
        p: float = 0.0,
        adaptive: bool = True,
        target: float = DEFAULT_TARGET,
        interval: int = DEFAULT_INTERVAL,
        speed_kimg: float = DEFAULT_SPEED_KIMG,
    ) -> None:
        super().__init__(p=p, adaptive=adaptive, target=target, interval=interval, speed_kimg=speed_kimg)
        self._replaced = 0  # images replaced in the last call (for stats)
        self._seen = 0

    def replace_reals(self, real: torch.Tensor, make_fake: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``real`` with each image replaced, with probability ``p``, by ``make_fake(n)`` (detached).

        ``make_fake(n)`` must return ``n`` generated images shaped like ``real[:n]``. It is called at most once,
        only if at least one image is replaced, with ``n`` = the number replaced.
        """
        n = real.shape[0]
        swap = torch.rand([n], device=real.device) < self.p
        count = int(swap.sum())
        self._replaced, self._seen = count, n
        if count == 0:
            return real
        fake = make_fake(count).detach()
        if tuple(fake.shape) != (count, *real.shape[1:]):
            raise ValueError(
                f"make_fake({count}) returned shape {tuple(fake.shape)}, expected {(count, *real.shape[1:])}"
            )
        out = real.clone()
        out[swap] = fake.to(device=real.device, dtype=real.dtype)
        return out

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        if self._seen:
            out["augment/replaced"] = self._replaced / self._seen
        return out
