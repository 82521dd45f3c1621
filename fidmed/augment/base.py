"""The one interface the training loop uses for every augmentation setting.

The LightningModule never asks which augmentation it has. Per minibatch it calls, in this order:

- ``replace_reals(real, make_fake)`` before the discriminator sees real images (APA swaps some reals for
  detached fakes; the others return ``real`` unchanged);
- ``__call__(images)`` on every image batch the discriminator sees: real and fake in the D step, fake in the
  G step (ADA and DiffAugment transform them differentiably; noaug and APA return them unchanged);
- ``observe_real_logits(logits)`` with the discriminator's raw logits on (augmented) reals in the D main phase;
- ``end_minibatch(batch_size)`` once per minibatch, where adaptive settings adjust ``p``.

``state_dict``/``load_state_dict`` carry ``p`` (and the controller's accumulators) through checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class Augmentation(torch.nn.Module):
    """Base class and the ``noaug`` setting: every hook is the identity."""

    name: str = "noaug"

    def __init__(self) -> None:
        super().__init__()
        # A buffer so that Lightning checkpoints and DDP broadcasts carry it.
        self.register_buffer("p", torch.zeros([]))

    @property
    def probability(self) -> float:
        return float(self.p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def replace_reals(self, real: torch.Tensor, make_fake: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return real

    def observe_real_logits(self, logits: torch.Tensor) -> None:
        return None

    def end_minibatch(self, batch_size: int) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        """Scalars worth logging (``augment/p`` and friends)."""
        return {"augment/p": self.probability}
