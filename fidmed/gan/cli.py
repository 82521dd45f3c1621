"""The generator subcommands of the ``fidmed`` command.

    fidmed import-generator PKL [--out OUT] [--which G_ema|G] [--allow-modified-source]
        convert a stylegan2-ada-pytorch network-snapshot-*.pkl to a fidmed .pt without running any code from it

A converted file is not needed to evaluate a pickle (``fidmed evaluate X.pkl``, ``generator=X.pkl`` read it in
memory); it is a file that ``torch.load(weights_only=True)`` reads, for other tools.
"""

from __future__ import annotations

import argparse


def cmd_import_generator(args: argparse.Namespace) -> int:
    from fidmed.gan.checkpoint import read_generator_record
    from fidmed.gan.pickle_import import write_imported_generator

    out = write_imported_generator(
        args.pkl, args.out, which=args.which, allow_modified_source=args.allow_modified_source
    )
    src = read_generator_record(out)["source"]
    print(f"wrote {out} (from {src['path']}, sha256 {src['sha256']})")
    if not src["module_src_is_reference"]:
        print(
            f"note: its networks.py differs from stylegan2-ada-pytorch's (sha256 {src['module_src_sha256']}); "
            f"imported because --allow-modified-source was given, and {out} records it."
        )
    return 0


def add_gan_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``import-generator`` on the ``fidmed`` command."""
    from pathlib import Path

    p = sub.add_parser(
        "import-generator",
        help="convert a stylegan2-ada-pytorch network-snapshot-*.pkl to a "
        "fidmed generator .pt without running any code from it",
    )
    p.add_argument("pkl", type=Path, help="network-snapshot-*.pkl")
    p.add_argument("--out", type=Path, default=None, help="output path (default: <pkl stem>.fidmed.pt next to it)")
    p.add_argument(
        "--which",
        choices=["G_ema", "G"],
        default="G_ema",
        help="which generator of the snapshot (the study evaluated G_ema)",
    )
    p.add_argument(
        "--allow-modified-source",
        action="store_true",
        help="import a pickle whose embedded networks.py is not stylegan2-ada-pytorch's (refused by "
        "default: such a generator may compute something other than the network its weights fit); "
        "the record says so",
    )
    p.set_defaults(func=cmd_import_generator)
