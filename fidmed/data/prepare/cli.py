"""The ``fidmed prepare`` sub-commands; :func:`add_prepare_parser` registers them on the ``fidmed`` parser.

    fidmed prepare xray    --src ChestX-ray14/         --out data/xray
    fidmed prepare ct      --src SLIVER07/scan/        --out data/ct
    fidmed prepare mri     --src Task01_BrainTumour/imagesTr --out data/mri  [--rescale slice]
    fidmed prepare cardiac --src ACDC/database/        --out data/cardiac
    fidmed prepare dicom   --src DICOM/ --out data/mine [--window 40,400] [--slices 10:-10] [--resolution 256]

Every sub-command reproduces the study's preparation by default (see each module's docstring), writes 8-bit
PNGs plus ``manifest.json``, resumes an interrupted run, and skips-and-lists bad files (``--strict`` stops).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from fidmed.errors import ConfigError

_DESCRIPTION = """\
Raw dataset -> a folder of 8-bit PNGs plus manifest.json, as the study prepared it (by default).

    fidmed prepare xray    --src ChestX-ray14/               --out data/xray
    fidmed prepare ct      --src SLIVER07/scan/              --out data/ct
    fidmed prepare mri     --src Task01_BrainTumour/imagesTr --out data/mri   [--rescale slice]
    fidmed prepare cardiac --src ACDC/database/              --out data/cardiac
    fidmed prepare dicom   --src DICOM/ --out data/mine [--window 40,400] [--slices 10:-10] [--resolution 256]

Runs resume where they stopped; bad files are skipped and listed (in manifest.json too), or stop the run with
--strict. `fidmed prepare NAME --help` lists each one's options."""

_SUBCOMMANDS = {
    "xray": "NIH ChestX-ray14 PNGs -> 8-bit grey PNGs (the study's prepare_chestxray14.py)",
    "ct": "SLIVER07 .mhd volumes -> every axial slice, per-slice min-max (the study's prepare_sliver07.py)",
    "mri": "MSD brain tumour 4-D NIfTIs -> 4 sequences, volume min-max, pad 256, >15%% non-zero "
           "(the study's prepare_MSDbt.py)",
    "cardiac": "ACDC 4-D NIfTIs -> frame 0, pad square, B-spline 256, min-max (the study's prepare_ACDC.py)",
    "dicom": "a folder of DICOM series -> windowed 8-bit slices (not in the study)",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 0,1,2,3), got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("input and output")
    group.add_argument("--src", required=True, help="the raw dataset folder")
    group.add_argument("--out", required=True, help="output folder (created; PNGs + manifest.json)")
    run = common.add_argument_group("run")
    run.add_argument("--workers", type=_positive_int, default=None,
                     help="worker processes (default: CPU count, at most 8; 1 = no worker processes)")
    run.add_argument("--strict", action="store_true",
                     help="stop at the first unreadable/bad file instead of skipping and listing it")
    run.add_argument("--overwrite", action="store_true",
                     help="--out was prepared with other parameters: delete its images and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--quantize", choices=("round", "floor"), default="round",
                     help="float [0, 255] to uint8: round to nearest (default) or truncate; the study's own 8-bit "
                          "conversion is not in its code")
    return common


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``prepare`` and its sub-commands (xray, ct, mri, cardiac, dicom) on ``fidmed``'s sub-parsers."""
    prepare = subparsers.add_parser("prepare", help="prepare a dataset: raw files -> 8-bit PNGs + manifest.json",
                                    description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = prepare.add_subparsers(dest="prepare_command", required=True, metavar="{xray,ct,mri,cardiac,dicom}")
    common = _common_options()

    def add(name: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=_SUBCOMMANDS[name],
                                description=_SUBCOMMANDS[name].replace("%%", "%"))
        parser.set_defaults(func=cmd_prepare)
        return parser

    p = add("xray")
    p.add_argument("--high-depth", choices=("refuse", "rescale"), default="refuse",
                   help="16/32-bit PNGs: refuse (listed as skipped; default) or min-max rescale to 8 bits")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="resize to N x N (default: native size, as the study)")

    p = add("ct")
    p.add_argument("--pattern", default="*.mhd", help="file-name pattern of the volumes (default *.mhd)")
    p.add_argument("--constant", choices=("skip", "zero"), default="skip",
                   help="constant slices (min = max): skip and list (default) or write black")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="resize to N x N (default: native size, as the study)")

    p = add("mri")
    p.add_argument("--rescale", choices=("volume", "slice"), default="volume",
                   help="min-max per sequence volume (the study's script; default) or per slice (its README)")
    p.add_argument("--sequences", type=_int_list, default=(0, 1, 2, 3),
                   help="sequences to keep, 0=FLAIR 1=T1w 2=T1gd 3=T2w (default 0,1,2,3)")
    p.add_argument("--pad-to", type=_positive_int, default=256, help="zero-pad slices to N x N (default 256)")
    p.add_argument("--min-nonzero", type=_fraction, default=0.15,
                   help="keep a slice when its share of non-zero pixels exceeds this (default 0.15)")
    p.add_argument("--nan", choices=("zero", "skip"), default="zero",
                   help="NaN/inf voxels: read as 0 and list the file (SimpleITK's reading, the study's; default) "
                        "or skip the file")

    p = add("cardiac")
    p.add_argument("--frames", type=_int_list, default=(0,), help="time frames to keep (default 0)")
    p.add_argument("--size", type=_positive_int, default=256, help="B-spline resample to N x N (default 256)")
    p.add_argument("--constant", choices=("skip", "zero"), default="skip",
                   help="constant slices: skip and list (default) or write black")
    p.add_argument("--nan", choices=("zero", "skip"), default="zero",
                   help="NaN/inf voxels: read as 0 and list the file (SimpleITK's reading, the study's; default) "
                        "or skip the file")

    p = add("dicom")
    p.add_argument("--window", default="minmax",
                   help="minmax (per slice; default), volume (per series), dicom (the files' WindowCenter/Width) "
                        "or CENTER,WIDTH in modality units, e.g. 40,400")
    p.add_argument("--slices", default="all",
                   help="all (default), middle, or START:STOP[:STEP] over each series' sorted slices")
    p.add_argument("--square", choices=("pad", "none"), default="pad",
                   help="pad non-square slices to a square with the slice minimum (default) or keep them")
    p.add_argument("--resolution", type=_positive_int, default=None, help="resize to N x N (default: native)")
    p.add_argument("--constant", choices=("skip", "zero"), default="skip",
                   help="constant slices under --window minmax: skip and list (default) or write black")
    return prepare


def preparer_from_args(args: argparse.Namespace) -> Any:
    """The preparer an argparse namespace of ``fidmed prepare <name>`` describes."""
    from fidmed.data import prepare as P

    name = args.prepare_command
    q = args.quantize
    if name == "xray":
        return P.XrayPreparer(high_depth=args.high_depth, resolution=args.resolution, quantize=q)
    if name == "ct":
        return P.CTPreparer(pattern=args.pattern, constant=args.constant, resolution=args.resolution, quantize=q)
    if name == "mri":
        return P.MRIPreparer(rescale=args.rescale, sequences=args.sequences, pad_to=args.pad_to,
                             min_nonzero=args.min_nonzero, nan=args.nan, quantize=q)
    if name == "cardiac":
        return P.CardiacPreparer(frames=args.frames, size=args.size, constant=args.constant, nan=args.nan,
                                 quantize=q)
    if name == "dicom":
        return P.DicomPreparer(window=args.window, slices=args.slices, square=args.square,
                               resolution=args.resolution, constant=args.constant, quantize=q)
    raise ConfigError(f"unknown preparer {name!r}")


def cmd_prepare(args: argparse.Namespace) -> int:
    """Handler of ``fidmed prepare <name>``: run, then print a summary (skipped files listed)."""
    from fidmed.data.prepare.common import MANIFEST_NAME, run_prepare

    logging.basicConfig(level=logging.WARNING, format="fidmed prepare: %(message)s")
    preparer = preparer_from_args(args)
    report = run_prepare(preparer, args.src, args.out, workers=args.workers, strict=args.strict,
                         overwrite=args.overwrite, progress=not args.no_progress)
    m = report.manifest
    sizes = ", ".join(f"{s['count']} x {s['width']}x{s['height']}" for s in m["image_sizes"])
    counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items() if k != "images" and v)
    print(f"fidmed prepare {preparer.name}: {m['counts']['images']} images ({sizes}) in {report.out}; "
          f"{report.converted} source(s) converted, {report.reused} already done; {counts}")
    if report.skipped:
        print(f"skipped ({len(report.skipped)}; all listed under 'skipped' in {report.out / MANIFEST_NAME}):",
              file=sys.stderr)
        for item in report.skipped[:20]:
            where = f" [{item['where']}]" if item["where"] else ""
            print(f"  {item['source']}{where}: {item['reason']}", file=sys.stderr)
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    if len(m["image_sizes"]) > 1:
        print("warning: the images differ in size; the training loader needs one size: re-run with --resolution",
              file=sys.stderr)
    print(f"content sha256 {m['content_sha256']}")
    return 0
