"""The adaptive augmentation probability shared by ADA and APA.

stylegan2-ada-pytorch (``training_loop.py``, "ADA heuristic") and DeceiveD (its "APA heuristic") adjust the
augmentation probability ``p`` the same way:

- every real image the discriminator sees contributes ``sign(D(x))`` (one value per logit) to a running sum;
- every ``interval`` minibatches, ``r_t`` = the mean of those signs since the last adjustment, and
  ``p += sign(r_t - target) * images / (speed_kimg * 1000)``, where ``images`` is the number of images shown
  during those ``interval`` minibatches (the reference writes ``batch_size * interval``, the same number when
  the batch size is constant); the sums are then reset.

Differences from the references, on purpose:

- ``p`` is clamped to ``[0, 1]`` (the references clamp only at 0; p > 1 has no meaning as a probability and
  users report a runaway p);
- an interval in which no real logits were observed leaves ``p`` unchanged (the references would compute the
  sign of NaN and turn ``p`` into NaN).

Under DDP every rank calls ``end_minibatch``; the sign sums, logit counts and image counts of the minibatch are
summed across ranks there (one ``all_reduce`` of three numbers per minibatch), so every rank holds the same
accumulators and takes the same decision: ``p`` stays identical on all ranks. Reducing every minibatch (not only
at the decision) also keeps the accumulators correct when DDP broadcasts rank 0's buffers at every forward.

State: ``sign_sum``, ``sign_count``, ``image_count`` and ``rt`` are buffers (saved in checkpoints and restored on
resume); the minibatch counter travels as the module's extra state (a plain int, so that deciding whether this
minibatch ends an interval needs no device synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fidmed.augment.base import Augmentation
from fidmed.errors import ConfigError

DEFAULT_TARGET = 0.6  # the ADA and APA target the study used (docs/study.md#augmentation)
DEFAULT_INTERVAL = 4  # stylegan2-ada-pytorch training_loop(ada_interval=4)
DEFAULT_SPEED_KIMG = 500.0  # stylegan2-ada-pytorch training_loop(ada_kimg=500)


@dataclass
class AdaptiveConfig:
    """The options of an augmentation with an adaptive probability ``p`` (ADA, APA): the heuristic of
    stylegan2-ada-pytorch's ``training_loop.py``. Every ``interval`` minibatches, ``p += sign(r_t - target) *
    images shown / (speed_kimg * 1000)``, clamped to [0, 1], where ``r_t`` is the mean sign of D's logits on reals.

    Numbers keep the type they are given (``p=1`` stays an integer), so that a configuration's training
    fingerprint is what it was when these options were YAML files.
    """

    name: str = ""
    #: the value of ``r_t`` that ``p`` steers towards (the study: 0.6 for ADA and APA)
    target: int | float = DEFAULT_TARGET
    #: minibatches between two adjustments of ``p``
    interval: int = DEFAULT_INTERVAL
    #: thousands of images over which ``p`` can move by 1
    speed_kimg: int | float = 500
    #: the initial ``p`` (the fixed ``p`` when ``adaptive`` is false)
    p: int | float = 0.0
    #: adapt ``p`` (true) or keep it at its initial value (false)
    adaptive: bool = True


def _distributed_world() -> int:
    """World size of the default process group, or 1 when torch.distributed is not in use."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], or a ConfigError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"augmentation.{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ConfigError(f"augmentation.{name} must be in [0, 1], got {v}; set e.g. augmentation.{name}=0.6")
    return v


class AdaptiveP(torch.nn.Module):
    """Accumulates the signs of D's real logits and moves a probability ``p`` towards ``target``.

    ``observe(logits)`` adds a batch of real logits; ``end_minibatch(p, batch_size)`` counts one minibatch and,
    at the end of every ``interval`` minibatches, updates the tensor ``p`` in place.
    """

    def __init__(
        self, target: float = DEFAULT_TARGET, interval: int = DEFAULT_INTERVAL, speed_kimg: float = DEFAULT_SPEED_KIMG
    ) -> None:
        super().__init__()
        self.target = check_probability("target", target)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"augmentation.interval must be a positive integer (minibatches), got {interval!r}")
        self.interval = interval
        if isinstance(speed_kimg, bool) or not isinstance(speed_kimg, (int, float)) or not speed_kimg > 0:
            raise ConfigError(
                f"augmentation.speed_kimg must be a number > 0 (kimg for p to move by 1), got {speed_kimg!r}"
            )
        self.speed_kimg = float(speed_kimg)
        self.minibatches = 0  # minibatches since training started (extra state)
        # Accumulated since the last adjustment (float64: exact counts far beyond any training length).
        self.register_buffer("sign_sum", torch.zeros([], dtype=torch.float64))
        self.register_buffer("sign_count", torch.zeros([], dtype=torch.float64))
        self.register_buffer("image_count", torch.zeros([], dtype=torch.float64))
        # r_t of the last adjustment (NaN until the first one), for logging.
        self.register_buffer("rt", torch.full([], float("nan"), dtype=torch.float64))
        # This rank's observations of the current minibatch; reduced across ranks in end_minibatch. Always zero
        # between minibatches, so not part of the state dict.
        self.register_buffer("_pending", torch.zeros([2], dtype=torch.float64), persistent=False)

    def observe(self, logits: torch.Tensor) -> None:
        """Add the signs of a batch of D's raw logits on real images (any shape; every element counts)."""
        logits = logits.detach()
        signs = logits.sign().sum(dtype=torch.float64)
        update = torch.stack([signs, torch.full_like(signs, float(logits.numel()))])
        self._pending.add_(update.to(self._pending.device))

    def end_minibatch(self, p: torch.Tensor, batch_size: int) -> None:
        """Count one minibatch of ``batch_size`` images on this rank; adjust ``p`` in place every interval."""
        reduced = torch.cat([self._pending, self._pending.new_full([1], float(batch_size))])
        if _distributed_world() > 1:
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        self._pending.zero_()
        self.sign_sum.add_(reduced[0])
        self.sign_count.add_(reduced[1])
        self.image_count.add_(reduced[2])
        self.minibatches += 1
        if self.minibatches % self.interval != 0:
            return
        # Decide on the device, without a host synchronisation.
        has_obs = self.sign_count > 0
        rt = self.sign_sum / self.sign_count.clamp(min=1)
        step = torch.sign(rt - self.target) * self.image_count / (self.speed_kimg * 1000)
        step = torch.where(has_obs, step, torch.zeros_like(step))
        p.copy_((p + step.to(p.dtype)).clamp(0, 1))
        self.rt.copy_(torch.where(has_obs, rt, torch.full_like(rt, float("nan"))))
        self.sign_sum.zero_()
        self.sign_count.zero_()
        self.image_count.zero_()

    def get_extra_state(self) -> dict[str, int]:
        return {"minibatches": self.minibatches}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.minibatches = int(state["minibatches"])

    def extra_repr(self) -> str:
        return f"target={self.target}, interval={self.interval}, speed_kimg={self.speed_kimg}"


class AdaptiveAugmentation(Augmentation):
    """An augmentation whose probability ``p`` is fixed or driven by an :class:`AdaptiveP` (ADA, APA)."""

    def __init__(
        self,
        p: float = 0.0,
        adaptive: bool = True,
        target: float = DEFAULT_TARGET,
        interval: int = DEFAULT_INTERVAL,
        speed_kimg: float = DEFAULT_SPEED_KIMG,
    ) -> None:
        super().__init__()
        self.p.fill_(check_probability("p", p))
        if not isinstance(adaptive, bool):
            raise ConfigError(f"augmentation.adaptive must be true or false, got {adaptive!r}")
        self.controller: AdaptiveP | None = AdaptiveP(target, interval, speed_kimg) if adaptive else None

    @property
    def adaptive(self) -> bool:
        return self.controller is not None

    def observe_real_logits(self, logits: torch.Tensor) -> None:
        if self.controller is not None:
            self.controller.observe(logits)

    def end_minibatch(self, batch_size: int) -> None:
        """``batch_size``: the images this rank showed D this minibatch (ranks are summed under DDP)."""
        if self.controller is not None:
            self.controller.end_minibatch(self.p, batch_size)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        if self.controller is not None:
            rt = float(self.controller.rt)
            if rt == rt:  # NaN until the first adjustment
                out["augment/rt"] = rt
        return out
