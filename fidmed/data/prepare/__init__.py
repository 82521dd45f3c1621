"""``fidmed prepare``: the study's four datasets and DICOM series to folders of 8-bit PNGs plus ``manifest.json``.

From the command to the code: ``fidmed prepare NAME`` runs the preparer registered as NAME in
:data:`PREPARERS`, one module each (:mod:`~fidmed.data.prepare.xray`: NIH ChestX-ray14, :mod:`~.ct`: SLIVER07,
:mod:`~.mri`: MSD brain tumour, :mod:`~.cardiac`: ACDC, :mod:`~.dicom`: a user's DICOM series), which also holds
its help and options. The shared parts: :mod:`~.preparer` (the base class, the registry), :mod:`~.sources`
(finding raw files), :mod:`~.pixels` (rescaling, padding, quantisation), :mod:`~.output` (the output folder:
atomic writes, resume state, manifest), :mod:`~.runner` (:func:`run_prepare`: checks, resume, worker processes,
interruption) and :mod:`~.cli` (the sub-commands, built from the registry). The medical-format libraries
(SimpleITK, nibabel, pydicom) are imported when used.

    from fidmed.data.prepare import CTPreparer, run_prepare
    report = run_prepare(CTPreparer(), "SLIVER07/scan", "data/ct")

The preparer classes are found by class name in the registry (``CTPreparer`` above), so that a new preparer
needs nothing but its own module.
"""

from __future__ import annotations

from typing import Any

from fidmed.data.prepare.preparer import PREPARERS, BadSource, Preparer, PreparerInfo
from fidmed.data.prepare.runner import PrepareReport, run_prepare

__all__ = ["PREPARERS", "BadSource", "PrepareReport", "Preparer", "PreparerInfo", "run_prepare"]


def __getattr__(name: str) -> Any:
    """A registered preparer class by its class name (``from fidmed.data.prepare import CTPreparer``)."""
    if name.endswith("Preparer"):
        for entry in PREPARERS.entries():
            if getattr(entry.obj, "__name__", None) == name:
                return entry.obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
