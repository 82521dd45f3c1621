"""Augmentation settings behind one interface (see :mod:`fidmed.augment.base`), one registration each.

Built in (:data:`AUGMENTATIONS` lists every registered one, plugins included):

- ``noaug``: :class:`Augmentation` (identity);
- ``ada``: :class:`fidmed.augment.ada.ADA`, stylegan2-ada-pytorch's augmentation pipeline with adaptive ``p``;
- ``apa``: :class:`fidmed.augment.apa.APA`, adaptive pseudo augmentation (DeceiveD);
- ``diffaugment``: :class:`fidmed.augment.diffaugment.DiffAugment`.

``build_augmentation(cfg)`` builds the one a config names.
"""

from __future__ import annotations

from fidmed.augment.base import AUGMENTATIONS, Augmentation, augmentation_options, build_augmentation

__all__ = ["AUGMENTATIONS", "Augmentation", "augmentation_options", "build_augmentation"]
