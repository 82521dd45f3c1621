"""``fidmed weights list | import | download``: the registered extractors' weights files.

fidmed weights list                 every extractor's weights file: digests, where from, present or missing
fidmed weights import PATH [...]    recognise downloaded files by their content and put them in the weights folder
fidmed weights download [NAME ...]  download (when online) and verify
"""

from __future__ import annotations

import argparse
from typing import Any

from fidmed.errors import FidmedError


def _digest_text(wfile: Any) -> str:
    if wfile.sha256 is not None:
        return wfile.sha256 + ("" if wfile.full_hash else " (prefix)")
    unpinned = "UNPINNED (no published sha256; the local file's digest is recorded with results)"
    return f"md5 {wfile.md5} (published); {unpinned}" if wfile.md5 else unpinned


def cmd_weights_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fidmed.features.registry import weights_files
    from fidmed.features.weights import default_weights_dir, find_weights

    weights_dir = args.weights_dir
    table = Table(title=f"extractor weights (weights folder: {weights_dir or default_weights_dir()})")
    for col in ("extractor", "file", "digest", "status", "source"):
        table.add_column(col, overflow="fold")
    for name, wfile in weights_files().items():
        try:
            path = find_weights(wfile, weights_dir)
            status = f"present: {path}" if path else "missing"
        except FidmedError as exc:
            status = f"INVALID: {exc}"
        table.add_row(name, wfile.filename, _digest_text(wfile), status, " ".join(wfile.urls) or wfile.how_to)
    Console(width=200).print(table)
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    from fidmed.features.registry import import_weights_file

    for src in args.paths:
        done = import_weights_file(src, args.weights_dir)
        print(f"imported {src} -> {done.path}: {done.verified}")
    return 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    from fidmed.features.registry import check_weights_file, weights_files
    from fidmed.features.weights import resolve_weights, sha256_of

    for name, wfile in weights_files(args.names or None).items():
        path = resolve_weights(wfile, args.weights_dir, allow_download=True, extractor=name)
        if wfile.sha256 is not None:
            print(f"{name}: {path} (sha256 {sha256_of(path)} matches the published digest)")
            continue
        try:  # nothing published to compare with: the file must at least load into its network
            loaded = check_weights_file(wfile, path)
        except FidmedError as exc:
            raise FidmedError(
                f"{name}: {path} does not load into its network, delete it and download it again: {exc}"
            ) from None
        md5 = f"md5 {wfile.md5} matches the published md5; " if wfile.md5 else ""
        print(f"{name}: {path} ({md5}{loaded}; sha256 {sha256_of(path)} recorded (unpinned))")
    return 0


def add_weights_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fidmed weights list|import|download`` to the ``fidmed`` command's subparsers."""
    weights = subparsers.add_parser(
        "weights",
        help="extractor weights: list, import, download",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--weights-dir", default=None, help="weights folder (default: $FIDMED_WEIGHTS or ~/.cache/fidmed/weights)"
    )
    p = wsub.add_parser("list", parents=[common], help="every extractor's weights file and whether it is here")
    p.set_defaults(func=cmd_weights_list)
    p = wsub.add_parser(
        "import",
        parents=[common],
        help="recognise downloaded files (published digest, else the network they load into) and "
        "copy them into the weights folder under their canonical names",
    )
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_weights_import)
    p = wsub.add_parser("download", parents=[common], help="download and verify (needs internet)")
    p.add_argument("names", nargs="*", help="extractor names (default: all)")
    p.set_defaults(func=cmd_weights_download)
    return weights
