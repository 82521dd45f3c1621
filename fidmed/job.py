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

import torch
from omegaconf import OmegaConf

import fidmed
from fidmed.atomic import check_writable
from fidmed.config import Stage, WeightsMode
from fidmed.errors import ConfigError, FidmedError

log = logging.getLogger(__name__)


def extractor_configs(cfg: Any) -> list[Any]:
    """The selected extractors (``extractor=[a,b]`` puts one config per name under ``cfg.extractor``)."""
    node = cfg.extractor
    if node is None or len(node) == 0:
        raise ConfigError("no extractor selected; use extractor=inception_tf or extractor=[a,b].")
    return [node[k] for k in node]


def build_extractors(cfg: Any, announce=print) -> list[torch.nn.Module]:
    """Build every selected extractor, checking all weights first (``eval.weights``: see
    :class:`fidmed.config.WeightsMode`)."""
    from fidmed.features.registry import build_extractor, check_weights_available

    mode = WeightsMode(cfg.eval.weights)
    ex_cfgs = extractor_configs(cfg)
    weights_dir = cfg.paths.weights_dir
    allow_download = cfg.eval.allow_download
    if mode is WeightsMode.random:
        return [
            _random(
                build_extractor(
                    OmegaConf.merge(c, {"weights_source": "random"}), weights_dir=weights_dir, allow_random=True
                ),
                "chosen (eval.weights=random)",
            )
            for c in ex_cfgs
        ]
    status = check_weights_available(
        ex_cfgs,
        weights_dir=weights_dir,
        allow_download=allow_download,
        raise_on_missing=(mode is WeightsMode.pretrained),
    )
    invalid = [s for s in status.values() if s.state == "invalid"]
    if invalid:  # a wrong hash is never papered over, not even by the demo
        raise FidmedError("\n\n".join(f"[{s.name}] {s.message}" for s in invalid))
    extractors = []
    for c in ex_cfgs:
        if status[c.name].ok:
            extractors.append(build_extractor(c, weights_dir=weights_dir, allow_download=allow_download))
        else:
            announce(
                f"\n!! RANDOM-INIT extractor: no weights for '{c.name}' here:\n"
                f"{status[c.name].message}\n!! The demo continues with a random-init '{c.name}', labelled "
                f"RANDOM-INIT in the table, results.json and W&B; its FDs are NOT comparable to published "
                f"numbers. Install the weights (`fidmed weights list`) for real scores.\n"
            )
            extractors.append(
                _random(
                    build_extractor(
                        OmegaConf.merge(c, {"weights_source": "random"}), weights_dir=weights_dir, allow_random=True
                    ),
                    "substituted: no weights file here (eval.weights=random_if_missing)",
                )
            )
    return extractors


def _random(extractor: Any, reason: str) -> Any:
    """Record why an extractor has random weights (shown with every number it makes)."""
    extractor.random_init_reason = reason
    return extractor


def check_job(cfg: Any) -> None:
    """Value checks that span groups (types, single values' ranges and unknown keys are the schemas' job)."""
    if cfg.stage == Stage.evaluate and not cfg.generator:
        raise ConfigError("stage=evaluate needs generator=PATH (a network-snapshot-*.pt, final.pt or last.ckpt).")
    if cfg.schedule.kimg is None and cfg.stage != Stage.evaluate:
        raise ConfigError(
            f"schedule.kimg is not set: modality {cfg.modality.name} has no study training length "
            f"(modality.study_kimg); set schedule.kimg=N or choose schedule=default."
        )
    if cfg.stage != Stage.evaluate and cfg.schedule.kimg <= 0:
        raise ConfigError(f"schedule.kimg={cfg.schedule.kimg}; training length must be > 0 kimg.")
    for key in ("num_gen", "batch_size"):
        if cfg.eval[key] < 1:
            raise ConfigError(f"eval.{key}={cfg.eval[key]} must be >= 1.")


def generator_provenance(path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Where a generator came from, recorded in the protocol of every number made from it: its file, training
    fingerprint and kimg, and for a stylegan2-ada-pytorch pickle its sha256 and whether the network source
    embedded in it is the reference's."""
    out: dict[str, Any] = {"path": str(path), "fingerprint": record.get("fingerprint"), "kimg": record.get("kimg")}
    source = record.get("source") or {}
    if source.get("sha256"):
        out["pickle_sha256"] = source["sha256"]
        out["pickle_source_is_reference"] = source.get("module_src_is_reference")
    return out


def evaluator_from_config(eval_cfg: Any, extractors: list[Any], real: Any, cache_dir: str | None) -> Any:
    """The Evaluator an ``eval`` config node describes (run.py and ``fidmed evaluate`` share it)."""
    from fidmed.evaluation.evaluator import Evaluator
    from fidmed.metrics.base import METRICS

    options = {e.name: eval_cfg[e.name] for e in METRICS.entries() if e.config is not None and e.name in eval_cfg}
    return Evaluator(
        extractors,
        real,
        cache_dir=cache_dir,
        batch_size=eval_cfg.batch_size,
        device=eval_cfg.device,
        real_split_seed=eval_cfg.real_split_seed,
        metrics=list(eval_cfg.metrics),
        metric_options=options,
        precision=eval_cfg.precision.value,
        metric_seed=eval_cfg.metric_seed,
        num_workers=eval_cfg.num_workers,
        channels_last=eval_cfg.channels_last,
        compile=eval_cfg.compile,
        uncertainty=eval_cfg.get("uncertainty"),
        audit=eval_cfg.get("audit"),
        heldout=heldout_source(eval_cfg),
    )


def generator_source(G: Any, eval_cfg: Any, num: int, device: Any, provenance: Any = None) -> Any:
    """``num`` images of generator ``G`` made as ``eval`` says (seeds from ``eval.seed_start``, truncation, noise)."""
    from fidmed.evaluation.sources import GeneratorSource

    return GeneratorSource(
        G, num, eval_cfg.seed_start, eval_cfg.truncation_psi, eval_cfg.noise_mode.value, device, provenance=provenance
    )


def heldout_source(eval_cfg: Any) -> Any:
    """The held-out real split of the memorisation audit (``eval.audit.heldout``), or None."""
    audit = eval_cfg.get("audit")
    path = audit.get("heldout") if audit is not None else None
    if not path:
        return None
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.sources import DatasetSource

    return DatasetSource(ImageFolderDataset(path, cache="none"))


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
    from fidmed.evaluation.results import (
        format_results_table,
        results_table_rows,
        summary_values,
        write_audit_files,
        write_results_json,
    )
    from fidmed.evaluation.sources import DatasetSource, GeneratorSource
    from fidmed.gan.callbacks import read_fd_history
    from fidmed.gan.checkpoint import load_generator
    from fidmed.gan.fingerprint import train_dir_for, training_fingerprint
    from fidmed.gan.train import check_training, launch_rank, train_or_reuse
    from fidmed.tracking import build_tracker, image_grid, log_audit_grids

    run_dir = Path(run_dir)
    check_job(cfg)
    check_writable(run_dir, "the run folder (hydra.run.dir)", is_dir=True)
    check_writable(cfg.paths.cache_dir, "the statistics cache paths.cache_dir", is_dir=True)
    if cfg.stage != Stage.evaluate:
        check_writable(cfg.paths.train_root, "the training folder paths.train_root", is_dir=True)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        tracker.summary({"fidmed/job": job_name, "fidmed/stage": cfg.stage.value})
        torch.manual_seed(cfg.seed)
        dataset = build_dataset(cfg.modality)
        if cfg.stage != Stage.evaluate:
            check_training(cfg)  # a GPU trainer without a GPU, an unwritable training folder: before any work
        extractors = build_extractors(cfg)
        if cfg.eval.num_real is not None and cfg.eval.num_real > len(dataset):
            raise FidmedError(
                f"eval.num_real={cfg.eval.num_real} but the real set {getattr(dataset, 'name', '')} has "
                f"only {len(dataset)} images; lower eval.num_real or leave it null (all images)."
            )
        real = DatasetSource(dataset, cfg.eval.num_real)
        evaluator = evaluator_from_config(cfg.eval, extractors, real, cfg.paths.cache_dir)

        def evaluate_during_training(G, kimg):
            gen = generator_source(G, cfg.eval, cfg.eval.num_gen_training, evaluator.device)
            home = next(G.parameters()).device  # G_ema trains where the trainer put it; put it back afterwards
            G.to(evaluator.device)
            try:
                recs = evaluator.evaluate(gen, desc=f"FD at {kimg:.2f} kimg", trust=False)
            finally:
                G.to(home)
            return {f"{r.metric}/{r.label}": r.value for r in recs}

        def log_grid(G, kimg):
            if not cfg.logger.log_images:
                return
            gen = GeneratorSource(G, 16, 0, 1.0, "const", next(G.parameters()).device)
            _, imgs = next(gen.batches(16))
            tracker.log_images("samples", image_grid(imgs.numpy()), caption=f"G_ema at {kimg:.2f} kimg, seeds 0-15")

        header: dict[str, Any] = {
            "fidmed_version": fidmed.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": str(run_dir),
            "stage": cfg.stage.value,
            "modality": cfg.modality.name,
            "augmentation": cfg.augmentation.name,
            "model": cfg.model.name,
            "host": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "device": str(evaluator.device),
                "platform": platform.platform(),
            },
        }
        if cfg.stage in (Stage.all, Stage.train):
            final = train_or_reuse(cfg, dataset, tracker, evaluate_during_training, log_grid)
            fingerprint = training_fingerprint(cfg)
            train_dir = train_dir_for(cfg, fingerprint)
            if rank == 0:
                link_training_folder(run_dir, train_dir)
            header["training"] = {
                "fingerprint": fingerprint,
                "train_dir": str(train_dir),
                "kimg": float(cfg.schedule.kimg),
                "fd_history": read_fd_history(train_dir),
            }
            generator_path = final
        else:
            generator_path = Path(cfg.generator)
        records = []
        if cfg.stage in (Stage.all, Stage.evaluate):
            G, record = load_generator(
                generator_path, evaluator.device, allow_modified_source=cfg.generator_allow_modified_source
            )
            if G.img_channels != dataset.num_channels:
                raise FidmedError(
                    f"the generator makes {G.img_channels}-channel images but the real set "
                    f"{getattr(dataset, 'name', '')} has {dataset.num_channels}; evaluate it against "
                    f"a modality with the same channels."
                )
            header["generator"] = {
                "path": str(generator_path),
                "kimg": record.get("kimg"),
                "fingerprint": record.get("fingerprint"),
                "source": record.get("source"),
            }
            gen = generator_source(
                G, cfg.eval, cfg.eval.num_gen, evaluator.device, generator_provenance(generator_path, record)
            )
            context = {
                "modality": cfg.modality.name,
                "augmentation": cfg.augmentation.name,
                "generator": str(generator_path),
                "kimg": record.get("kimg"),
            }
            # Under DDP every rank evaluates its disjoint shard of the seeds; the evaluator gathers exactly.
            records = evaluator.evaluate(gen, context=context)
            if rank != 0:  # rank 0 alone reports and writes
                exit_code = 0
                return {}
            log_grid(G, float(record.get("kimg") or 0))
            print(
                format_results_table(
                    records, title=f"fidmed results: {cfg.modality.name} / {cfg.augmentation.name} / {cfg.model.name}"
                )
            )
            rows, _ = results_table_rows(records)
            tracker.log_table("results", rows)
            write_audit_files(run_dir, records)  # per-image audit results and grids, paths into the records
            tracker.summary(summary_values(records))
            log_audit_grids(tracker, records)
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
    """One message, no stack trace, for mistakes a user can fix: one line, unless it lists several items (several
    extractors' missing weights) that a user reads one by one."""
    text = str(exc)
    print(f"fidmed: error: {text if chr(10) * 2 in text else ' '.join(text.split())}", file=sys.stderr)


ERROR_FILE = "error.txt"


def record_failure(run_dir: str | Path, exc: BaseException) -> None:
    """A failed job's reason on disk: ``<run_dir>/error.txt`` (the message; the traceback too for anything that
    is not a mistake a user can fix) and the job's ``run.log`` (through logging); user mistakes also go to stderr
    as one line."""
    import traceback

    if isinstance(exc, FidmedError):
        report_error(exc)
        text = f"{exc}\n"
        log.error("job failed: %s", exc)
    else:
        text = "".join(traceback.format_exception(exc))
        log.error("job failed with %s", type(exc).__name__, exc_info=exc)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / ERROR_FILE).write_text(text)
    except OSError as write_exc:  # a read-only run folder: the message above is all there is
        log.warning("could not write %s: %s", Path(run_dir) / ERROR_FILE, write_exc)


class _MultirunFailures:
    """What the multirun summary found (read by run.py for its exit status)."""

    failed: list[tuple[str, str]] = []


def multirun_exit_code() -> int:
    return 1 if _MultirunFailures.failed else 0


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _HydraCallback = object  # type: ignore[assignment,misc]


class FailureSummary(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (conf/config.yaml ``hydra.callbacks``): after a multirun, list the jobs that failed with
    their errors, so that a sweep whose jobs failed is not mistaken for a success (run.py then exits 1)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = []
        for err in sorted(sweep_dir.glob(f"*/{ERROR_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
            lines = err.read_text(errors="replace").strip().splitlines() or ["(no message)"]
            # a traceback's last line is the exception; a user mistake's message is its first line
            failed.append((err.parent.name, lines[-1] if lines[0].startswith("Traceback") else lines[0]))
        _MultirunFailures.failed = failed
        if failed:
            print(
                f"\nfidmed: {len(failed)} job(s) of this multirun failed (details in each job's {ERROR_FILE}):",
                file=sys.stderr,
            )
            for job, message in failed:
                print(f"  job {job} ({sweep_dir / job}): {message}", file=sys.stderr)
