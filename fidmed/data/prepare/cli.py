"""``fidmed prepare NAME``: one sub-command per registered preparer, built from :data:`PREPARERS`.

    fidmed prepare ct      --src SLIVER07/scan/              --out data/ct
    fidmed prepare mri     --src Task01_BrainTumour/imagesTr --out data/mri  [--rescale slice]
    fidmed prepare dicom   --src DICOM/ --out data/mine [--window 40,400] [--slices 10:-10] [--resolution 256]

Each sub-command's help, description and options come from its preparer's registration (the preparer's
module: ``fidmed prepare ct`` is :mod:`fidmed.data.prepare.ct`); this module adds the options every run shares
(``--src``, ``--out``, ``--workers`` ...), the argument types the preparers' options use, and the handler, which
runs :func:`fidmed.data.prepare.runner.run_prepare` and prints a summary. Ctrl-C stops a run cleanly with one
line and exit status 130; the same command resumes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from fidmed.data.prepare.preparer import PREPARERS

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT: the shell's status of a command stopped by Ctrl-C


# -- argument types and options shared by preparers -------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 0,1,2,3), got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """``--quantize round|floor`` (field ``quantize``, :func:`fidmed.data.prepare.pixels.to_uint8`)."""
    parser.add_argument(
        "--quantize",
        choices=("round", "floor"),
        default="round",
        help="float [0, 255] to uint8: round to nearest (default) or truncate; the study's own 8-bit "
        "conversion is not in its code",
    )


def add_nan_argument(parser: argparse.ArgumentParser) -> None:
    """``--nan zero|skip`` (field ``nan``) of the NIfTI preparers."""
    parser.add_argument(
        "--nan",
        choices=("zero", "skip"),
        default="zero",
        help="NaN/inf voxels: read as 0 and list the file (SimpleITK's reading, the study's; default) or skip the file",
    )


def _run_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("input and output")
    group.add_argument("--src", required=True, help="the raw dataset folder")
    group.add_argument("--out", required=True, help="output folder (created; PNGs + manifest.json)")
    run = common.add_argument_group("run")
    run.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="worker processes (default: CPU count, at most 8; 1 = no worker processes)",
    )
    run.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable/bad file instead of skipping and listing it"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="--out was prepared with other parameters: delete its images and start over",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return common


# -- the sub-commands -------------------------------------------------------------------------------------------


def _ordered_entries() -> list:
    """The registered preparers: the study's first, then the others, each group by name."""
    return sorted(PREPARERS.entries(), key=lambda e: (e.info.study_script is None, e.name))


def _description(entries: list) -> str:
    width = max(len(e.name) for e in entries)
    examples = "\n".join(f"    fidmed prepare {e.name:<{width}} {e.info.example}" for e in entries)
    return (
        f"Raw dataset -> a folder of 8-bit PNGs plus manifest.json, as the study prepared it (by default).\n\n"
        f"{examples}\n\n"
        "Runs resume where they stopped (after Ctrl-C too: run the same command again); bad files are skipped "
        "and listed\n(in manifest.json too), or stop the run with --strict. `fidmed prepare NAME --help` lists "
        "each one's options\nand where it differs from the study's script."
    )


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``prepare`` and one sub-command per registered preparer on ``fidmed``'s sub-parsers."""
    entries = _ordered_entries()
    prepare = subparsers.add_parser(
        "prepare",
        help="prepare a dataset: raw files -> 8-bit PNGs + manifest.json",
        description=_description(entries),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = prepare.add_subparsers(
        dest="prepare_command", required=True, metavar="{" + ",".join(e.name for e in entries) + "}"
    )
    common = _run_options()
    for entry in entries:
        parser = sub.add_parser(
            entry.name,
            parents=[common],
            help=entry.info.help.replace("%", "%%"),
            description=entry.info.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        entry.obj.add_arguments(parser)
        parser.set_defaults(func=cmd_prepare)
    return prepare


def preparer_from_args(args: argparse.Namespace) -> Any:
    """The preparer an argparse namespace of ``fidmed prepare NAME`` describes."""
    return PREPARERS.get(args.prepare_command).obj.from_args(args)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Handler of ``fidmed prepare NAME``: run, then print a summary (skipped files listed)."""
    from fidmed.data.prepare.output import MANIFEST_NAME
    from fidmed.data.prepare.runner import run_prepare

    logging.basicConfig(level=logging.WARNING, format="fidmed prepare: %(message)s")
    preparer = preparer_from_args(args)
    try:
        report = run_prepare(
            preparer,
            args.src,
            args.out,
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            f"fidmed prepare {preparer.name}: interrupted; {args.out} keeps the finished sources, run the same "
            f"command again to resume.",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT_STATUS
    m = report.manifest
    sizes = ", ".join(f"{s['count']} x {s['width']}x{s['height']}" for s in m["image_sizes"])
    counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items() if k != "images" and v)
    print(
        f"fidmed prepare {preparer.name}: {m['counts']['images']} images ({sizes}) in {report.out}; "
        f"{report.converted} source(s) converted, {report.reused} already done; {counts}"
    )
    if report.skipped:
        print(
            f"skipped ({len(report.skipped)}; all listed under 'skipped' in {report.out / MANIFEST_NAME}):",
            file=sys.stderr,
        )
        for item in report.skipped[:20]:
            where = f" [{item['where']}]" if item["where"] else ""
            print(f"  {item['source']}{where}: {item['reason']}", file=sys.stderr)
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    if len(m["image_sizes"]) > 1:
        print(
            "warning: the images differ in size; the training loader needs one size: re-run with --resolution",
            file=sys.stderr,
        )
    print(f"content sha256 {m['content_sha256']}")
    return 0
