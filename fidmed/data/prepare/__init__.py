"""``fidmed prepare``: the study's four datasets and DICOM series to folders of 8-bit PNGs plus ``manifest.json``.

One module per source dataset (xray: NIH ChestX-ray14, ct: SLIVER07, mri: MSD brain tumour, cardiac: ACDC,
dicom: a user's DICOM series), the shared machinery in :mod:`fidmed.data.prepare.common`, the command line in
:mod:`fidmed.data.prepare.cli`. The medical-format libraries (SimpleITK, pydicom) are imported when used.

    from fidmed.data.prepare import CTPreparer, run_prepare
    report = run_prepare(CTPreparer(), "SLIVER07/scan", "data/ct")
"""

from __future__ import annotations

from fidmed.data.prepare.cardiac import CardiacPreparer
from fidmed.data.prepare.common import BadSource, Preparer, PrepareReport, run_prepare
from fidmed.data.prepare.ct import CTPreparer
from fidmed.data.prepare.dicom import DicomPreparer
from fidmed.data.prepare.mri import MRIPreparer
from fidmed.data.prepare.xray import XrayPreparer

PREPARERS: dict[str, type[Preparer]] = {cls.name: cls for cls in (XrayPreparer, CTPreparer, MRIPreparer,
                                                                  CardiacPreparer, DicomPreparer)}

__all__ = ["PREPARERS", "BadSource", "CTPreparer", "CardiacPreparer", "DicomPreparer", "MRIPreparer", "Preparer",
           "PrepareReport", "XrayPreparer", "run_prepare"]
