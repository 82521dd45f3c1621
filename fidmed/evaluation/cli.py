"""``fidmed evaluate GEN REAL``: score a folder of images or a generator file against a real image folder.

GEN: a folder of PNG/JPEG images (e.g. the study's 50,000 generated PNGs), or a generator file (.pt / .ckpt
written by fidmed, or a stylegan2-ada-pytorch .pkl, read without running its code). REAL: a folder of images.
NIfTI/DICOM volumes: convert them first with ``fidmed prepare`` (the study's slice selection and windowing), then
point REAL at the prepared folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fidmed.errors import ConfigError, FidmedError

GENERATOR_SUFFIXES = (".pt", ".ckpt", ".pkl")


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="FD, relative FD, precision/recall/density/coverage (and KID, "
                              "FD-infinity) of generated images or a generator against real images",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gen", help="folder of generated images, or a generator file (.pt, .ckpt, .pkl)")
    p.add_argument("real", help="folder of real images (NIfTI/DICOM: run `fidmed prepare` first)")
    p.add_argument("--extractor", nargs="+", default=["inception_tf"], help="extractor names (conf/extractor/*.yaml)")
    p.add_argument("--metrics", nargs="+", default=["fd", "rfd"],
                   help="any of fd rfd prdc kid fd_inf (prdc = precision, recall, density, coverage; real set first)")
    p.add_argument("--num-gen", type=int, default=None,
                   help="generated images (a generator: seeds seed-start..; a folder: its first N files; default all)")
    p.add_argument("--num-real", type=int, default=None, help="real images (default: all)")
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--truncation-psi", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", default="auto",
                   help="threads reading/preprocessing ahead of the forward passes (auto = CPUs, max 16; 0 = none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "tf32"],
                   help="extractor forward passes (moments and FD are float64 always)")
    p.add_argument("--knn-k", type=int, default=5, help="neighbours for precision/recall/density/coverage")
    p.add_argument("--real-split-seed", type=int, default=0)
    p.add_argument("--weights", default="pretrained", choices=["pretrained", "random"],
                   help="random: untrained extractors, plumbing tests only (numbers labelled RANDOM-INIT)")
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--resizer", default=None, metavar="NAME",
                   help="clean | clean_clip | nearest | pil_bicubic | torch_bilinear: "
                        "override the selected extractors' resizer (their YAML's `resizer`), e.g. torch_bilinear "
                        "with inception_tf to reproduce `python -m pytorch_fid`; recorded with every number")
    p.add_argument("--cache-dir", default=None, help="real-statistics cache folder (default: none)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(func=cmd_evaluate)
    return p


def build_cli_extractors(names: list[str], weights: str, weights_dir: str | None,
                         resizer: str | None = None) -> list[Any]:
    from fidmed.cli import extractor_configs
    from fidmed.features.registry import build_extractor

    cfgs = extractor_configs()
    unknown = sorted(set(names) - set(cfgs))
    if unknown:
        raise ConfigError(f"unknown extractor(s) {', '.join(unknown)}; available: {', '.join(cfgs)}")
    out = []
    for name in names:
        cfg = dict(cfgs[name])
        if weights == "random":
            cfg["weights_source"] = "random"
        if resizer is not None:
            cfg["resizer"] = resizer
        out.append(build_extractor(cfg, weights_dir=weights_dir, allow_download=False,
                                   allow_random=weights == "random"))
    return out


def gen_source(path: str, num: int | None, seed_start: int, psi: float, device: Any) -> Any:
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.sources import DatasetSource, GeneratorSource

    p = Path(path)
    if p.is_dir():
        return DatasetSource(ImageFolderDataset(p, cache="none"), num)
    if p.suffix in GENERATOR_SUFFIXES and p.is_file():
        if p.suffix == ".pkl":
            import tempfile

            from fidmed.gan.legacy import write_imported_generator

            p = write_imported_generator(p, Path(tempfile.mkdtemp()) / f"{p.stem}.fidmed.pt")
        from fidmed.gan.checkpoint import load_generator

        G, _ = load_generator(p, device)
        if num is None:
            raise ConfigError("a generator needs --num-gen N (the study used 50,000)")
        return GeneratorSource(G, num, seed_start, psi, "const", device)
    raise FidmedError(f"{path} is neither a folder of images nor a generator file ({', '.join(GENERATOR_SUFFIXES)})")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.evaluator import Evaluator, resolve_device
    from fidmed.evaluation.results import format_results_table, write_results_json
    from fidmed.evaluation.sources import DatasetSource

    device = resolve_device(args.device)
    # cheap checks first (folders, counts, generator file), then the extractors (slow to build)
    real = DatasetSource(ImageFolderDataset(args.real, cache="none"), args.num_real)
    gen = gen_source(args.gen, args.num_gen, args.seed_start, args.truncation_psi, device)
    extractors = build_cli_extractors(args.extractor, args.weights, args.weights_dir, args.resizer)
    ev = Evaluator(extractors, real, cache_dir=args.cache_dir, batch_size=args.batch_size, device=device,
                   real_split_seed=args.real_split_seed, metrics=args.metrics, knn_k=args.knn_k,
                   precision=args.precision, num_workers=args.num_workers)
    records = ev.evaluate(gen, context={"gen": str(args.gen), "real": str(args.real)})
    print(format_results_table(records, title=f"{args.gen} vs {args.real}"))
    if args.out:
        path = write_results_json(args.out, records, {"command": "fidmed evaluate", "gen": str(args.gen),
                                                      "real": str(args.real), "metrics": ev.metrics})
        print(f"wrote {path}")
    return 0
