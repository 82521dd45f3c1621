"""The ``fidmed`` command: each sub-command lives with the code it runs and adds its own parser here.

    fidmed evaluate GEN REAL --extractor A B --metrics fd rfd prdc     fidmed/evaluation/cli.py
    fidmed prepare NAME --src RAW --out DIR                            fidmed/data/prepare/cli.py
    fidmed weights list | import PATH | download [NAME]                fidmed/features/cli.py
    fidmed import-generator PKL                                        fidmed/gan/cli.py
    fidmed vtt make | vtt score, collect, analyze, stats               fidmed/analysis/cli.py

``fidmed COMMAND --help`` lists each one's options (extractors, metrics and preparers as registered). Mistakes a
user can fix print one line naming the fix (no stack trace) and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fidmed.errors import FidmedError


def build_parser() -> argparse.ArgumentParser:
    from fidmed.analysis.cli import add_analysis_parsers
    from fidmed.data.prepare.cli import add_prepare_parser
    from fidmed.evaluation.cli import add_evaluate_parser
    from fidmed.features.cli import add_weights_parser
    from fidmed.gan.cli import add_gan_parsers

    parser = argparse.ArgumentParser(
        prog="fidmed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_evaluate_parser(sub)
    add_prepare_parser(sub)
    add_weights_parser(sub)
    add_gan_parsers(sub)
    add_analysis_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FidmedError as exc:
        print(f"fidmed: error: {' '.join(str(exc).splitlines()) if _one_line(exc) else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fidmed: interrupted; nothing half-written was kept (run the same command again to resume where "
            "that is supported)",
            file=sys.stderr,
        )
        return 130


def _one_line(exc: FidmedError) -> bool:
    """Messages are printed on one line unless they are lists a user reads item by item (several files)."""
    return "\n\n" not in str(exc)


if __name__ == "__main__":
    sys.exit(main())
