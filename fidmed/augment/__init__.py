"""Augmentation settings behind one interface (see :mod:`fidmed.augment.base`).

``build_augmentation(cfg)`` turns the ``augmentation`` config group into one of:

- ``noaug``: :class:`Augmentation` (identity);
- ``ada``: :class:`fidmed.augment.ada.ADA`, stylegan2-ada-pytorch's augmentation pipeline with adaptive ``p``;
- ``apa``: :class:`fidmed.augment.apa.APA`, adaptive pseudo augmentation (DeceiveD);
- ``diffaugment``: :class:`fidmed.augment.diffaugment.DiffAugment`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fidmed.augment.base import Augmentation

__all__ = ["Augmentation", "build_augmentation", "AUGMENTATIONS"]

# Keys each setting accepts (``name`` always).
AUGMENTATIONS: dict[str, tuple[str, ...]] = {
    "noaug": (),
    "ada": ("pipeline", "p", "adaptive", "target", "interval", "speed_kimg", "strengths"),
    "apa": ("p", "adaptive", "target", "interval", "speed_kimg"),
    "diffaugment": ("policy",),
}


def _plain(cfg: Any) -> dict[str, Any]:
    """A DictConfig, a mapping or None as a plain dict."""
    if cfg is None:
        return {}
    try:  # omegaconf is a hydra dependency; a plain dict works without it
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    from fidmed.errors import ConfigError

    raise ConfigError(f"the augmentation config must be a mapping with a 'name', got {cfg!r}")


def build_augmentation(cfg: Any) -> Augmentation:
    """Build the augmentation named by ``cfg.name`` (the ``augmentation`` config group; None = noaug).

    Unknown names or keys, and invalid values, raise :class:`fidmed.errors.ConfigError` naming the valid ones.
    """
    from fidmed.errors import ConfigError

    options = _plain(cfg)
    name = options.pop("name", "noaug")
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}; choose one of: {', '.join(AUGMENTATIONS)} "
                          f"(e.g. augmentation=ada)")
    unknown = sorted(set(options) - set(AUGMENTATIONS[name]))
    if unknown:
        valid = ", ".join(AUGMENTATIONS[name]) or "none"
        raise ConfigError(f"augmentation {name!r} does not take {', '.join(unknown)}; valid keys: {valid}")
    if name == "noaug":
        return Augmentation()
    if name == "ada":
        from fidmed.augment.ada import ADA

        strengths = options.pop("strengths", None) or {}
        if not isinstance(strengths, Mapping):
            raise ConfigError(f"augmentation.strengths must be a mapping like {{cutout: 0}}, got {strengths!r}")
        return ADA(**_adaptive_kwargs(options), pipeline=str(options.get("pipeline", "bgcfnc")),
                   strengths=dict(strengths))
    if name == "apa":
        from fidmed.augment.apa import APA

        return APA(**_adaptive_kwargs(options))
    from fidmed.augment.diffaugment import DiffAugment

    return DiffAugment(policy=options.get("policy", "color,translation,cutout"))


def _adaptive_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The controller settings present in ``options`` (absent ones keep their defaults)."""
    from fidmed.errors import ConfigError

    out = {k: options[k] for k in ("p", "target", "interval", "speed_kimg") if k in options}
    if "adaptive" in options:
        if not isinstance(options["adaptive"], bool):
            raise ConfigError(f"augmentation.adaptive must be true or false, got {options['adaptive']!r}")
        out["adaptive"] = options["adaptive"]
    return out
