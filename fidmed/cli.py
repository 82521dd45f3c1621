"""The ``fidmed`` command.

    fidmed weights list                 every extractor's weights file: sha256, where from, present or missing
    fidmed weights import PATH [...]    verify a downloaded file by its sha256 and put it in the weights folder
    fidmed weights download [NAME ...]  download (when online) and verify
    fidmed import-generator PKL         convert a stylegan2-ada-pytorch network-snapshot-*.pkl to a fidmed .pt
                                        without running any code from the pickle
    fidmed evaluate GEN REAL --extractor A B --metrics fd rfd prdc
                                        folder or generator vs folder, one pass for all extractors
    fidmed prepare xray|ct|mri|cardiac|dicom --src RAW --out DIR
                                        the study's dataset preparation (8-bit PNGs + manifest.json)
    fidmed vtt make | vtt score         build a blinded visual Turing test; score the raters' answers
    fidmed collect RUNS... / analyze RESULTS --vtt SCORES / stats
                                        tidy results table; FD-vs-human alignment report; the study's tests

Mistakes a user can fix print one message (no stack trace) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fidmed.errors import FidmedError


def conf_dir() -> Path:
    """The Hydra config tree next to the package (fidmed is installed editable from its checkout)."""
    path = Path(__file__).resolve().parents[1] / "conf"
    if not (path / "config.yaml").is_file():
        raise FidmedError(f"cannot find fidmed's config tree at {path}; install fidmed from its checkout with "
                          f"`pip install -e .` (as `make demo`/`make test` do).")
    return path


def extractor_configs() -> dict[str, dict]:
    """Every ``conf/extractor/*.yaml``, by name."""
    from omegaconf import OmegaConf

    out = {}
    for p in sorted((conf_dir() / "extractor").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
        out[cfg.get("name", p.stem)] = cfg
    return out


def _weights_specs(names: Sequence[str] | None = None):
    from fidmed.features.weights import WeightsSpec

    cfgs = extractor_configs()
    unknown = sorted(set(names or ()) - set(cfgs))
    if unknown:
        raise FidmedError(f"unknown extractor(s) {', '.join(unknown)}; available: {', '.join(cfgs)}")
    return {name: WeightsSpec.from_config(cfg["weights"]) for name, cfg in cfgs.items()
            if cfg.get("weights") and (not names or name in names)}


def cmd_weights_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fidmed.features.weights import default_weights_dir, find_weights

    weights_dir = args.weights_dir
    table = Table(title=f"extractor weights (weights folder: {weights_dir or default_weights_dir()})")
    for col in ("extractor", "file", "sha256", "status", "source"):
        table.add_column(col, overflow="fold")
    for name, spec in _weights_specs().items():
        try:
            path = find_weights(spec, weights_dir)
            status = f"present: {path}" if path else "missing"
        except FidmedError as exc:
            status = f"INVALID: {exc}"
        digest = spec.sha256 or "UNPINNED (no published sha256; the local file's digest is recorded with results)"
        table.add_row(name, spec.filename, digest, status, " ".join(spec.urls) or spec.how_to)
    Console(width=200).print(table)
    return 0


def cmd_weights_import(args) -> int:
    from fidmed.features.weights import import_weights

    specs = list(_weights_specs().values())
    for src in args.paths:
        spec, dest = import_weights(src, specs, args.weights_dir)
        print(f"imported {src} -> {dest} (sha256 {spec.sha256} verified)")
    return 0


def cmd_weights_download(args) -> int:
    from fidmed.features.weights import resolve_weights

    for name, spec in _weights_specs(args.names or None).items():
        path = resolve_weights(spec, args.weights_dir, allow_download=True)
        print(f"{name}: {path} (sha256 verified)")
    return 0


def cmd_import_generator(args) -> int:
    from fidmed.gan.checkpoint import read_generator_record
    from fidmed.gan.legacy import write_imported_generator

    out = write_imported_generator(args.pkl, args.out, which=args.which)
    src = read_generator_record(out)["source"]
    print(f"wrote {out} (from {src['path']}, sha256 {src['sha256']})")
    if not src["module_src_is_reference"]:
        print(f"note: its networks.py differs from stylegan2-ada-pytorch's (sha256 {src['module_src_sha256']}); "
              f"the weights matched fidmed's networks layer by layer all the same.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fidmed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    weights = sub.add_parser("weights", help="extractor weights: list, import, download")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights-dir", default=None,
                        help="weights folder (default: $FIDMED_WEIGHTS or ~/.cache/fidmed/weights)")
    p = wsub.add_parser("list", parents=[common], help="every extractor's weights file and whether it is here")
    p.set_defaults(func=cmd_weights_list)
    p = wsub.add_parser("import", parents=[common], help="verify files by sha256 and copy them into the weights folder")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_weights_import)
    p = wsub.add_parser("download", parents=[common], help="download and verify (needs internet)")
    p.add_argument("names", nargs="*", help="extractor names (default: all)")
    p.set_defaults(func=cmd_weights_download)

    p = sub.add_parser("import-generator", help="convert a stylegan2-ada-pytorch network-snapshot-*.pkl to a "
                       "fidmed generator .pt without running any code from it")
    p.add_argument("pkl", help="network-snapshot-*.pkl")
    p.add_argument("--out", default=None, help="output path (default: <pkl stem>.fidmed.pt next to it)")
    p.add_argument("--which", choices=["G_ema", "G"], default="G_ema",
                   help="which generator of the snapshot (the study evaluated G_ema)")
    p.set_defaults(func=cmd_import_generator)

    from fidmed.analysis.cli import add_analysis_parsers
    from fidmed.data.prepare.cli import add_prepare_parser

    from fidmed.evaluation.cli import add_evaluate_parser

    add_evaluate_parser(sub)
    add_prepare_parser(sub)
    add_analysis_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FidmedError as exc:
        print(f"fidmed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
