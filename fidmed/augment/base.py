"""The one interface the training loop uses for every augmentation setting, and their registry.

The LightningModule never asks which augmentation it has. Per minibatch it calls, in this order:

- ``replace_reals(real, make_fake)`` before the discriminator sees real images (APA swaps some reals for
  detached fakes; the others return ``real`` unchanged);
- ``__call__(images)`` on every image batch the discriminator sees: real and fake in the D step, fake in the
  G step (ADA and DiffAugment transform them differentiably; noaug and APA return them unchanged);
- ``observe_real_logits(logits)`` with the discriminator's raw logits on (augmented) reals in the D main phase;
- ``end_minibatch(batch_size)`` once per minibatch, where adaptive settings adjust ``p``.

``state_dict``/``load_state_dict`` carry ``p`` (and the controller's accumulators) through checkpoints.

**One registration per augmentation.** A setting is an :class:`Augmentation` subclass registered in
:data:`AUGMENTATIONS` together with its options schema, a dataclass whose ``name`` field is the registry name and
whose other fields are the class's constructor arguments with their defaults (and their documentation)::

    @dataclass
    class MyAugConfig:
        name: str = "myaug"
        strength: float = 0.5  # what it does

    @AUGMENTATIONS.register("myaug", config=MyAugConfig)
    class MyAug(Augmentation):
        name = "myaug"

        def __init__(self, strength: float = 0.5) -> None: ...

That is all: ``augmentation=myaug augmentation.strength=0.2`` on the command line (the config group holds one node
per registered schema), :func:`build_augmentation`, checkpoints and the training fingerprint (which records the
name and the options, never a module path) pick it up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fidmed.errors import ConfigError
from fidmed.registry import Registry, new_registry

#: Every augmentation setting, by name (``augmentation=NAME``); see the module docstring.
AUGMENTATIONS: Registry[type[Augmentation]] = new_registry(
    "augmentation", ("fidmed.augment",), hint="augmentation=NAME"
)


@dataclass
class NoAugConfig:
    """No augmentation: D sees the real and generated images as they are (stylegan2-ada-pytorch ``--aug noaug``)."""

    name: str = "noaug"


@AUGMENTATIONS.register("noaug", config=NoAugConfig)
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


# ----------------------------------------------------------------------------------------------------------------
def _plain(cfg: Any) -> dict[str, Any]:
    """A config dataclass instance, a DictConfig, a mapping or None as a plain dict."""
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"the augmentation config must be a mapping with a 'name' (e.g. {{'name': 'ada'}}), got {cfg!r}")


def augmentation_options(cfg: Any) -> dict[str, Any]:
    """The complete options of the augmentation ``cfg`` names: its schema's defaults, overridden by ``cfg``.

    ``cfg``: an augmentation's config dataclass, a DictConfig or a mapping with ``name`` (None = ``noaug``). An
    unknown name or key raises a :class:`ConfigError` naming the valid ones. The result (``name`` included) is a
    plain dict: what :func:`build_augmentation` builds from, and what a checkpoint saves to rebuild it.
    """
    options = _plain(cfg)
    name = options.pop("name", None) or "noaug"
    entry = AUGMENTATIONS.get(str(name))
    defaults = _plain(entry.config()) if entry.config is not None else {"name": entry.name}
    defaults.pop("name", None)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(
            f"augmentation {entry.name!r} does not take {', '.join(unknown)}; valid keys: {valid} "
            f"(e.g. augmentation={entry.name} augmentation.KEY=VALUE)"
        )
    return {"name": entry.name, **defaults, **options}


def build_augmentation(cfg: Any) -> Augmentation:
    """Build the augmentation named by ``cfg`` (see :func:`augmentation_options`; None = ``noaug``).

    The registered class is called with the options other than ``name``; it checks their values (raising a
    :class:`ConfigError` that names the valid ones).
    """
    options = augmentation_options(cfg)
    cls = AUGMENTATIONS.get(options.pop("name")).obj
    return cls(**options)
