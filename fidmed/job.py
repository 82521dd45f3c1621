"""One job of ``run.py``: train (or reuse) a generator, evaluate it, write results, always close the tracker.

Order matters for users: every check that can fail without training (config values, dataset present,
extractor weights available) runs before the first training step, so a job never trains for an hour and then
stops for a missing weights file.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

import fidmed
from fidmed.errors import ConfigError, FidmedError

log = logging.getLogger(__name__)

STAGES = ("all", "train", "evaluate")
WEIGHT_MODES = ("pretrained", "random", "random_if_missing")


def extractor_configs(cfg: Any) -> list[Any]:
    """The selected extractors (``extractor=[a,b]`` puts one config per name under ``cfg.extractor``)."""
    node = cfg.get("extractor")
    if node is None or len(node) == 0:
        raise ConfigError("no extractor selected; use extractor=inception_tf or extractor=[a,b].")
    return [node[k] for k in node]


def build_extractors(cfg: Any, announce=print) -> list[torch.nn.Module]:
    """Build every selected extractor, checking all weights first.

    ``eval.weights``: ``pretrained`` (default) never substitutes anything: missing weights offline stop the job
    with the fix. ``random`` builds random-init extractors on purpose (plumbing tests). ``random_if_missing``
    (the demo) uses real weights where present and a loudly labelled random-init network where not.
    """
    from fidmed.features.registry import build_extractor, check_weights_available

    mode = str(cfg.eval.weights)
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"eval.weights={mode!r}; choose one of {', '.join(WEIGHT_MODES)}.")
    ex_cfgs = extractor_configs(cfg)
    weights_dir = cfg.paths.get("weights_dir")
    allow_download = bool(cfg.eval.get("allow_download", True))
    if mode == "random":
        return [build_extractor(OmegaConf.merge(c, {"weights_source": "random"}), weights_dir=weights_dir,
                                allow_random=True) for c in ex_cfgs]
    status = check_weights_available(ex_cfgs, weights_dir=weights_dir, allow_download=allow_download,
                                     raise_on_missing=(mode == "pretrained"))
    invalid = [s for s in status.values() if s.state == "invalid"]
    if invalid:  # a wrong hash is never papered over, not even by the demo
        raise FidmedError("\n\n".join(f"[{s.name}] {s.message}" for s in invalid))
    extractors = []
    for c in ex_cfgs:
        if status[c.name].ok:
            extractors.append(build_extractor(c, weights_dir=weights_dir, allow_download=allow_download))
        else:
            announce(f"\n!! RANDOM-INIT extractor: no weights for '{c.name}' here:\n"
                     f"{status[c.name].message}\n!! The demo continues with a random-init '{c.name}', labelled "
                     f"RANDOM-INIT in the table, results.json and W&B; its FDs are NOT comparable to published "
                     f"numbers. Install the weights (`fidmed weights list`) for real scores.\n")
            extractors.append(build_extractor(OmegaConf.merge(c, {"weights_source": "random"}),
                                              weights_dir=weights_dir, allow_random=True))
    return extractors


def check_config(cfg: Any) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r}; choose one of {', '.join(STAGES)}.")
    if cfg.stage == "evaluate" and not cfg.get("generator"):
        raise ConfigError("stage=evaluate needs generator=PATH (a network-snapshot-*.pt, final.pt or last.ckpt).")
    if cfg.schedule.kimg is None and cfg.stage != "evaluate":
        raise ConfigError(f"schedule.kimg is not set: modality {cfg.modality.name} has no study training length "
                          f"(modality.study_kimg); set schedule.kimg=N or choose schedule=default.")
    if float(cfg.schedule.kimg) <= 0 and cfg.stage != "evaluate":
        raise ConfigError(f"schedule.kimg={cfg.schedule.kimg}; training length must be > 0 kimg.")
    for key in ("num_gen", "batch_size"):
        if int(cfg.eval[key]) < 1:
            raise ConfigError(f"eval.{key}={cfg.eval[key]} must be >= 1.")


def quiet_libraries() -> None:
    """Keep the console for fidmed's progress and results: Lightning's banners and known-harmless warnings off."""
    import warnings

    import lightning  # noqa: F401  (it sets its loggers' levels on import; set ours after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # G_ema is in eval mode on purpose (it only runs inference).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # The loader is endless by design: training length is counted in images (schedule.kimg).
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def run_job(cfg: Any, run_dir: str | Path, job_name: str = "fidmed") -> dict[str, Any]:
    """The whole job. Returns the results payload (also written to ``<run_dir>/results.json``)."""
    quiet_libraries()
    from fidmed.data.datamodule import build_dataset
    from fidmed.evaluation.evaluator import Evaluator
    from fidmed.evaluation.results import format_results_table, results_table_rows, write_results_json
    from fidmed.evaluation.sources import DatasetSource, GeneratorSource
    from fidmed.gan.checkpoint import load_generator
    from fidmed.gan.train import launch_rank, read_fd_history, train_dir_for, train_or_reuse, training_fingerprint
    from fidmed.tracking import build_tracker, image_grid

    run_dir = Path(run_dir)
    check_config(cfg)
    rank = launch_rank()
    config = OmegaConf.to_container(cfg, resolve=True)
    # The tracker comes first and is always finished (finally below), so a job that fails in any later check
    # leaves a finished (failed) W&B run, and the next job of a multirun starts its own. Under DDP only rank 0
    # tracks (Lightning's loggers log from rank 0 anyway).
    tracker = build_tracker(cfg.logger if rank == 0 else None, run_dir, config, job_name)
    exit_code = 1
    try:
        # Start the run now (W&B creates it lazily on the first log): every job, even one that only reuses a
        # generator or fails in a check below, has its own run, so a sweep sees every trial.
        tracker.summary({"fidmed/job": job_name, "fidmed/stage": str(cfg.stage)})
        torch.manual_seed(int(cfg.seed))
        dataset = build_dataset(cfg.modality)
        extractors = build_extractors(cfg)
        real = DatasetSource(dataset, None if cfg.eval.num_real is None else int(cfg.eval.num_real))
        if real.num > len(dataset):
            raise FidmedError(f"eval.num_real={real.num} but the real set {getattr(dataset, 'name', '')} has only "
                              f"{len(dataset)} images; lower eval.num_real or leave it null (all images).")
        evaluator = Evaluator(extractors, real, cache_dir=cfg.paths.cache_dir, batch_size=int(cfg.eval.batch_size),
                              device=cfg.eval.device, real_split_seed=int(cfg.eval.real_split_seed),
                              metrics=list(cfg.eval.metrics), knn_k=int(cfg.eval.get("knn_k", 5)),
                          precision=str(cfg.eval.get("precision", "fp32")),
                          metric_seed=int(cfg.eval.get("metric_seed", 0)),
                          kid_subsets=int(cfg.eval.get("kid_subsets", 100)),
                          kid_subset_size=int(cfg.eval.get("kid_subset_size", 1000)),
                          num_workers=cfg.eval.get("num_workers", "auto"))

        def evaluate_during_training(G, kimg):
            gen = GeneratorSource(G, int(cfg.eval.num_gen_training), int(cfg.eval.seed_start),
                                  float(cfg.eval.truncation_psi), str(cfg.eval.noise_mode), evaluator.device)
            home = next(G.parameters()).device  # G_ema trains where the trainer put it; put it back afterwards
            G.to(evaluator.device)
            try:
                recs = evaluator.evaluate(gen, desc=f"FD at {kimg:.2f} kimg")
            finally:
                G.to(home)
            return {f"{r.metric}/{r.label}": r.value for r in recs}

        def log_grid(G, kimg):
            if not cfg.logger.get("log_images", False):
                return
            gen = GeneratorSource(G, 16, 0, 1.0, "const", next(G.parameters()).device)
            _, imgs = next(gen.batches(16))
            tracker.log_images("samples", image_grid(imgs.numpy()), caption=f"G_ema at {kimg:.2f} kimg, seeds 0-15")

        header: dict[str, Any] = {
            "fidmed_version": fidmed.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": str(run_dir), "stage": cfg.stage, "modality": cfg.modality.name,
            "augmentation": cfg.augmentation.name, "model": cfg.model.name,
            "host": {"python": platform.python_version(), "torch": torch.__version__,
                     "device": str(evaluator.device), "platform": platform.platform()},
        }
        if cfg.stage in ("all", "train"):
            final = train_or_reuse(cfg, dataset, tracker, evaluate_during_training, log_grid)
            fingerprint = training_fingerprint(cfg)
            train_dir = train_dir_for(cfg, fingerprint)
            if rank == 0:
                link_training_folder(run_dir, train_dir)
            header["training"] = {"fingerprint": fingerprint, "train_dir": str(train_dir),
                                  "kimg": float(cfg.schedule.kimg), "fd_history": read_fd_history(train_dir)}
            generator_path = final
        else:
            generator_path = Path(str(cfg.generator))
        records = []
        if cfg.stage in ("all", "evaluate"):
            G, record = load_generator(generator_path, evaluator.device)
            if G.img_channels != dataset.num_channels:
                raise FidmedError(f"the generator makes {G.img_channels}-channel images but the real set "
                                  f"{getattr(dataset, 'name', '')} has {dataset.num_channels}; evaluate it against "
                                  f"a modality with the same channels.")
            header["generator"] = {"path": str(generator_path), "kimg": record.get("kimg"),
                                   "fingerprint": record.get("fingerprint"), "source": record.get("source")}
            gen = GeneratorSource(G, int(cfg.eval.num_gen), int(cfg.eval.seed_start), float(cfg.eval.truncation_psi),
                                  str(cfg.eval.noise_mode), evaluator.device)
            context = {"modality": cfg.modality.name, "augmentation": cfg.augmentation.name,
                       "generator": str(generator_path), "kimg": record.get("kimg")}
            # Under DDP every rank evaluates its disjoint shard of the seeds; the evaluator gathers exactly.
            records = evaluator.evaluate(gen, context=context)
            if rank != 0:  # rank 0 alone reports and writes
                exit_code = 0
                return {}
            log_grid(G, float(record.get("kimg") or 0))
            print(format_results_table(records, title=f"fidmed results: {cfg.modality.name} / "
                                                     f"{cfg.augmentation.name} / {cfg.model.name}"))
            rows = results_table_rows(records)
            tracker.log_table("results", rows)
            tracker.summary({f"{r.metric}/{r.label}": r.value for r in records})
        if rank != 0:  # DDP, stage=train: rank 0 writes the job's results.json
            exit_code = 0
            return {}
        payload_path = write_results_json(run_dir / "results.json", records, header)
        print(f"results: {payload_path}")
        exit_code = 0
        return json.loads(payload_path.read_text())
    except FidmedError as exc:
        try:  # the failed run shows why in W&B; never hide the job's own error behind a logging one
            tracker.summary({"fidmed/error": str(exc)})
        except Exception as log_exc:  # noqa: BLE001
            log.warning("could not record the error in the tracker: %s", log_exc)
        raise
    finally:
        tracker.finish(exit_code)


def link_training_folder(run_dir: Path, train_dir: Path) -> None:
    """``<run_dir>/training`` -> the shared training folder (checkpoints, snapshots, FD history)."""
    link = Path(run_dir) / "training"
    if link.is_symlink() or link.exists():
        return
    try:
        link.symlink_to(Path(train_dir).resolve(), target_is_directory=True)
    except OSError:  # file systems without symlinks: say where it is instead
        (Path(run_dir) / "training.txt").write_text(f"{Path(train_dir).resolve()}\n")


def report_error(exc: BaseException) -> None:
    """One message, no stack trace, for mistakes a user can fix."""
    print(f"\nfidmed: error: {exc}", file=sys.stderr)
