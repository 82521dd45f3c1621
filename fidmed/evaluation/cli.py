"""``fidmed evaluate GEN REAL``: score a folder of images or a generator file against a real image folder.

GEN: a folder of PNG/JPEG images (e.g. the study's 50,000 generated PNGs), or a generator file (.pt / .ckpt
written by fidmed, or a stylegan2-ada-pytorch .pkl, read in memory without running its code). REAL: a folder of
images. NIfTI/DICOM volumes: convert them first with ``fidmed prepare`` (the study's slice selection and
windowing), then point REAL at the prepared folder.

The evaluation settings are run.py's ``eval`` group, composed from the same schema and defaults
(fidmed/config.py): the options below set its keys, and ``--set KEY=VALUE`` any other (``--set prdc.k=3``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fidmed.errors import ConfigError, FidmedError

GENERATOR_SUFFIXES = (".pt", ".ckpt", ".pkl")

#: option -> eval key (the option's value is passed as a Hydra override of ``eval.<key>``)
_EVAL_OPTIONS = {
    "num_gen": "num_gen",
    "num_real": "num_real",
    "seed_start": "seed_start",
    "truncation_psi": "truncation_psi",
    "batch_size": "batch_size",
    "num_workers": "num_workers",
    "device": "device",
    "precision": "precision",
    "real_split_seed": "real_split_seed",
    "metric_seed": "metric_seed",
    "channels_last": "channels_last",
    "compile": "compile",
    "uncertainty": "uncertainty.replicates",
    "audit_memorisation": "audit.enabled",
}


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    from fidmed.config import EvalBase, Precision
    from fidmed.features.registry import EXTRACTORS
    from fidmed.metrics.base import METRICS

    defaults = EvalBase()
    metrics_help = "; ".join(f"{e.name}: {e.info.summary}" for e in METRICS.entries())
    p = subparsers.add_parser(
        "evaluate",
        help="FD, relative FD, precision/recall/density/coverage, KID, FD-infinity "
        "of generated images or a generator against real images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("gen", help="folder of generated images, or a generator file (.pt, .ckpt, .pkl)")
    p.add_argument("real", help="folder of real images (NIfTI/DICOM: run `fidmed prepare` first)")
    p.add_argument(
        "--extractor",
        nargs="+",
        default=["inception_tf"],
        metavar="NAME",
        help=f"registered extractors: {', '.join(EXTRACTORS.names())} (default: inception_tf)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"default: {' '.join(defaults.metrics)}. {metrics_help}",
    )
    p.add_argument(
        "--num-gen",
        type=int,
        default=None,
        help="generated images (a generator: seeds seed-start..; a folder: its first N files; default all)",
    )
    p.add_argument("--num-real", type=int, default=None, help="real images (default: all)")
    p.add_argument("--seed-start", type=int, default=None, help=f"default {defaults.seed_start}")
    p.add_argument("--truncation-psi", type=float, default=None, help=f"default {defaults.truncation_psi}")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {defaults.batch_size}")
    p.add_argument(
        "--num-workers",
        default=None,
        help="threads reading/preprocessing ahead of the forward passes (auto = CPUs, max 16; 0 = none)",
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument(
        "--precision",
        default=None,
        choices=[m.value for m in Precision],
        help="extractor forward passes (moments and FD are float64 always; default fp32)",
    )
    p.add_argument(
        "--compile",
        action="store_const",
        const="true",
        default=None,
        help="torch.compile each extractor's forward (features within 1e-4 of eager; compiling takes a minute or "
        "more per extractor and batch shape; on the CPU it needs a C++ compiler)",
    )
    p.add_argument(
        "--channels-last",
        action="store_const",
        const="true",
        default=None,
        help="run the extractors in the channels_last memory format (faster on most hardware; fp32 features "
        "within float32 rounding of the default contiguous layout, not bit for bit)",
    )
    p.add_argument("--real-split-seed", type=int, default=None, help=f"default {defaults.real_split_seed}")
    p.add_argument("--metric-seed", type=int, default=None, help=f"default {defaults.metric_seed}")
    p.add_argument(
        "--uncertainty",
        type=int,
        default=None,
        metavar="N",
        help="bootstrap N replicates of every number: standard error and confidence interval from the features "
        "of the same pass (e.g. 200; eval.uncertainty.*: --set uncertainty.block_size=...)",
    )
    p.add_argument(
        "--audit-memorisation",
        action="store_const",
        const="true",
        default=None,
        help="each generated image's nearest training (real) image per extractor and in pixel space, "
        "authenticity, copies, and C_T with --heldout; per-image CSVs and grids of the closest pairs next to --out",
    )
    p.add_argument(
        "--heldout",
        default=None,
        metavar="DIR",
        help="folder of held-out real images never trained on, for the data-copying test C_T (with "
        "--audit-memorisation)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other eval setting, as in run.py's eval group, e.g. --set prdc.k=3 --set kid.subsets=50",
    )
    p.add_argument(
        "--weights",
        default="pretrained",
        choices=["pretrained", "random"],
        help="random: untrained extractors, plumbing tests only (numbers labelled RANDOM-INIT)",
    )
    p.add_argument(
        "--weights-dir",
        default=None,
        help="extractor weights folder (default: $FIDMED_WEIGHTS or ~/.cache/fidmed/weights)",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="download missing extractor weights (needs internet; verified by sha256)",
    )
    p.add_argument(
        "--allow-modified-source",
        action="store_true",
        help="accept a stylegan2-ada-pytorch pickle whose embedded network source differs from the "
        "reference (its weights are still read without running anything from it; recorded)",
    )
    p.add_argument(
        "--resizer",
        default=None,
        metavar="NAME",
        help="clean | clean_clip | nearest | pil_bicubic | torch_bilinear: override the selected "
        "extractors' resizer, e.g. torch_bilinear with inception_tf to reproduce "
        "`python -m pytorch_fid`; recorded with every number",
    )
    p.add_argument("--cache-dir", default=None, help="real-statistics cache folder (default: none)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(func=cmd_evaluate)
    return p


def eval_config(args: argparse.Namespace) -> Any:
    """The ``eval`` and ``extractor`` nodes run.py would compose with these options (typed, checked)."""
    from fidmed.config import compose_config

    overrides = [f"extractor=[{','.join(args.extractor)}]"]
    for option, key in _EVAL_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            overrides.append(f"eval.{key}={value}")
    if args.metrics:
        overrides.append(f"eval.metrics=[{','.join(args.metrics)}]")
    if getattr(args, "heldout", None):
        if not args.audit_memorisation:
            raise ConfigError("--heldout is read by the memorisation audit only; add --audit-memorisation.")
        overrides.append("eval.audit.heldout=" + json.dumps(str(args.heldout)))
    overrides += [f"eval.{item}" for item in args.set]
    if args.resizer:
        overrides += [f"extractor.{name}.resizer={args.resizer}" for name in args.extractor]
    return compose_config(overrides)  # raises ConfigError: one line naming the fix


def build_cli_extractors(cfg: Any, weights: str, weights_dir: str | None, allow_download: bool) -> list[Any]:
    from fidmed.features.registry import build_extractor
    from fidmed.job import extractor_configs

    out = []
    for node in extractor_configs(cfg):
        if weights == "random":
            node = {**dict(node), "weights_source": "random"}
        ex = build_extractor(
            node, weights_dir=weights_dir, allow_download=allow_download, allow_random=weights == "random"
        )
        if weights == "random":
            ex.random_init_reason = "chosen (--weights random)"
        out.append(ex)
    return out


def gen_source(
    path: str, num: int | None, seed_start: int, psi: float, device: Any, allow_modified_source: bool = False
) -> Any:
    """An image folder or a generator file as an image source (a .pkl is imported in memory: nothing is written)."""
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.sources import DatasetSource, GeneratorSource

    p = Path(path)
    if p.is_dir():
        return DatasetSource(ImageFolderDataset(p, cache="none"), num)
    if p.suffix in GENERATOR_SUFFIXES and p.is_file():
        from fidmed.gan.checkpoint import load_generator

        if num is None:
            raise ConfigError("a generator needs --num-gen N (the study used 50,000)")
        from fidmed.job import generator_provenance

        G, record = load_generator(p, device, allow_modified_source=allow_modified_source)
        return GeneratorSource(G, num, seed_start, psi, "const", device, provenance=generator_provenance(p, record))
    if p.exists():
        raise FidmedError(
            f"{path} is neither a folder of images nor a generator file "
            f"({', '.join(GENERATOR_SUFFIXES)}); give a folder or a generator"
        )
    raise FidmedError(
        f"{path} does not exist; give a folder of generated images or a generator file "
        f"({', '.join(GENERATOR_SUFFIXES)})"
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fidmed.atomic import check_writable
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.evaluator import resolve_device
    from fidmed.evaluation.results import format_results_table, write_audit_files, write_results_json
    from fidmed.evaluation.sources import DatasetSource
    from fidmed.job import evaluator_from_config

    check_writable(args.out, "--out", is_dir=False)
    check_writable(args.cache_dir, "--cache-dir", is_dir=True)
    cfg = eval_config(args)
    ev_cfg = cfg.eval
    device = resolve_device(ev_cfg.device)
    # cheap checks first (folders, counts, generator file), then the extractors (slow to build)
    real = DatasetSource(ImageFolderDataset(args.real, cache="none"), ev_cfg.num_real)
    gen = gen_source(
        args.gen, args.num_gen, ev_cfg.seed_start, ev_cfg.truncation_psi, device, args.allow_modified_source
    )
    extractors = build_cli_extractors(cfg, args.weights, args.weights_dir, args.allow_download)
    ev = evaluator_from_config(ev_cfg, extractors, real, args.cache_dir)
    records = ev.evaluate(gen, context={"gen": str(args.gen), "real": str(args.real)})
    if args.out:  # the audit's per-image results and closest-pair grids beside the results file
        for f in write_audit_files(Path(args.out).resolve().parent, records):
            print(f"wrote {f}")
    print(format_results_table(records, title=f"{args.gen} vs {args.real}"))
    if ev.audit is not None and not args.out:
        print("note: the audit's per-image results and the grids of the closest pairs are written with --out FILE")
    if args.out:
        path = write_results_json(
            args.out,
            records,
            {"command": "fidmed evaluate", "gen": str(args.gen), "real": str(args.real), "metrics": ev.metrics},
        )
        print(f"wrote {path}")
    return 0
