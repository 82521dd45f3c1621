"""Training orchestration: fingerprinted training folders, a lock, resume, snapshots and progress.

A training run is identified by its *fingerprint*: the sha256 of every setting that changes the trained weights
(modality data settings, augmentation, model, training length, seed, precision). Its folder
``<train_root>/<modality>-<augmentation>-<fingerprint[:12]>/`` holds ``checkpoints/last.ckpt`` (full state, for
resume), ``checkpoints/network-snapshot-*.pt`` (G_ema, for evaluation), ``final.pt`` once training finished,
and ``fingerprint.json``. Jobs that differ only in evaluation settings (``-m extractor=a,b``) compute the same
fingerprint and reuse one generator; a job that finds another one training the same generator waits on the
folder's lock instead of training it twice. A crashed run resumes from ``last.ckpt``.

Resuming is exact: ``last.ckpt`` holds, besides the weights, optimiser moments and counters, every rank's training
random stream (:mod:`fidmed.gan.rng`) and the sampler's position (:class:`fidmed.data.datamodule.ImageDataModule`),
so a run killed at any point and started again writes the same snapshots, ``final.pt`` and FD history as a run
that was never interrupted (bitwise on the same machine and software with the same thread count; see the README).
A snapshot is written before the ``last.ckpt`` that points past it, and the FD history is cut back to the resumed
checkpoint (the evaluations after it are repeated, with the same results), so no file of a killed run is missing or
doubled after the resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
import numpy as np
import torch
from filelock import FileLock
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fidmed.atomic import atomic_write
from fidmed.data.folder import PREPARE_MANIFEST
from fidmed.errors import FidmedError
from fidmed.gan.checkpoint import atomic_torch_save, snapshot_name
from fidmed.gan.rng import fork_random_state

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 2  # 2: a prepared folder is identified by its manifest.json, not by where it lies
# Settings that do not change the trained weights and so stay out of the fingerprint.
#: Lightning arguments that change the trained weights (the others, and the checkpoint/evaluation intervals, do
#: not). strategy and num_nodes enter only when they differ from Lightning's defaults, as before they were settings.
_WEIGHT_TRAINER_KEYS = ("accelerator", "devices", "precision", "strategy", "num_nodes")
_TRAINER_DEFAULTS = {"strategy": "auto", "num_nodes": 1}
_NON_WEIGHT_MODALITY_KEYS = {"study_kimg", "path_hint", "cache", "cache_dir", "num_workers"}


def data_identity(modality: dict[str, Any]) -> dict[str, Any]:
    """What identifies a folder modality's images in the fingerprint.

    A folder written by ``fidmed prepare`` is identified by the sha256 of its ``manifest.json`` (deterministic:
    preparer, parameters, source files by relative path, outputs), so a prepared folder copied or moved
    elsewhere (e.g. to a cluster's scratch disk) keeps its fingerprint and its trained generator. Any other
    folder is identified by its path, as before: fidmed cannot tell a moved folder from a different one without
    reading every file.
    """
    path = modality.get("path")
    if modality.get("kind") != "folder" or not path:
        return {}
    manifest = Path(str(path)).expanduser() / PREPARE_MANIFEST
    if manifest.is_file():
        return {"prepared_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    return {"path": str(path)}


def fingerprint_record(cfg: Any) -> dict[str, Any]:
    """The settings that define a trained generator."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    modality = {k: v for k, v in plain(cfg.modality).items() if k not in _NON_WEIGHT_MODALITY_KEYS}
    modality.pop("path", None)
    modality.update(data_identity(plain(cfg.modality)))
    lightning = plain(cfg.trainer)
    trainer = {k: lightning[k] for k in _WEIGHT_TRAINER_KEYS
               if k in lightning and lightning[k] != _TRAINER_DEFAULTS.get(k, object())}
    trainer["kimg"] = plain(cfg.schedule)["kimg"]  # the training length (recorded under its historic place)
    return {"version": FINGERPRINT_VERSION, "modality": modality, "augmentation": plain(effective_augmentation(cfg)),
            "model": plain(cfg.model), "trainer": trainer, "seed": int(cfg.seed)}


def effective_augmentation(cfg: Any) -> Any:
    """The augmentation config with the modality's overrides applied (the study: ADA ``bgcfn`` and DiffAugment
    ``color,translation`` for mri)."""
    overrides = (cfg.modality.get("augmentation_overrides") or {}).get(cfg.augmentation.name) or {}
    return OmegaConf.merge(cfg.augmentation, overrides)


def training_fingerprint(cfg: Any) -> str:
    text = json.dumps(fingerprint_record(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def train_dir_for(cfg: Any, fingerprint: str | None = None) -> Path:
    fp = fingerprint or training_fingerprint(cfg)
    return Path(cfg.paths.train_root) / f"{cfg.modality.name}-{cfg.augmentation.name}-{fp[:12]}"


def launch_rank() -> int:
    """This process's rank in a DDP launch, read from the environment the launcher set before the job started
    (torchrun: RANK; SLURM with several tasks: SLURM_PROCID; Lightning's own children: NODE_RANK/LOCAL_RANK).
    0 exactly for the global rank-0 process, and outside any launch."""
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    local, node = int(env.get("LOCAL_RANK", "0") or 0), int(env.get("NODE_RANK", "0") or 0)
    if not (local or node):
        return 0
    per_node = int(env.get("LOCAL_WORLD_SIZE", "") or 0) or local + 1  # unknown per-node count: a lower bound
    return node * per_node + local


# --------------------------------------------------------------------------------------------------------
class SnapshotCallback(L.Callback):
    """Every ``every_kimg``: an atomic ``last.ckpt`` (resume point) and a G_ema snapshot (evaluation)."""

    def __init__(self, folder: Path, every_kimg: float, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.every = max(1, int(round(float(every_kimg) * 1000)))
        self.fingerprint = fingerprint
        self._next: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        seen = int(pl_module.images_seen)
        self._next = (seen // self.every + 1) * self.every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seen = int(pl_module.images_seen)
        if seen >= self._next or trainer.should_stop:
            self.save(trainer, pl_module)
            self._next = (seen // self.every + 1) * self.every

    def save(self, trainer, pl_module) -> Path:
        ckpt = self.folder / "last.ckpt"
        tmp = self.folder / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            # The snapshot first: a run killed between the two writes resumes from the previous last.ckpt and
            # writes this snapshot again (identically); the other order would lose it.
            snap = pl_module.generator_snapshot()
            snap["fingerprint"] = self.fingerprint
            atomic_torch_save(snap, self.folder / snapshot_name(pl_module.kimg))
            os.replace(tmp, ckpt)
        trainer.strategy.barrier()
        return ckpt

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        record = pl_module.generator_snapshot()
        record["fingerprint"] = self.fingerprint
        checkpoint["fidmed"] = record


class GradientAllReduce(L.Callback):
    """DDP gradient averaging for the manual G/D phases: before every optimiser step, the gradients of that
    optimiser's parameters are summed across ranks and divided by the world size (as stylegan2-ada-pytorch's
    training loop does), so every rank applies the same update. The loss calls ``backward()`` itself several
    times per step, so DDP's own reducer cannot be relied on for this; averaging equal gradients again is a
    no-op, so it is harmless where the reducer did synchronise."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        import torch.distributed as dist

        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= trainer.world_size
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is not None:
                p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n


class KimgProgressBar(L.Callback):
    """A progress bar in images shown to D (the unit of training length), with the latest losses."""

    def __init__(self, total_images: int) -> None:
        self.total = int(total_images)
        self.bar = None
        self._last = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._last = int(pl_module.images_seen)
            self.bar = tqdm(total=self.total, initial=min(self._last, self.total), unit="img", desc="training",
                            dynamic_ncols=True, smoothing=0.1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        seen = int(pl_module.images_seen)
        self.bar.update(min(seen, self.total) - min(self._last, self.total))
        self._last = seen
        metrics = trainer.callback_metrics
        post = {"kimg": f"{seen / 1000:.2f}"}
        for key, short in (("Loss/G/loss", "G"), ("Loss/D/loss", "D"), ("augment/p", "p")):
            if key in metrics:
                post[short] = f"{float(metrics[key]):.3f}"
        self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PeriodicEvaluation(L.Callback):
    """FD of G_ema every ``every_kimg`` (fixed seeds), logged as ``fd/<extractor>`` and kept in a history."""

    def __init__(self, every_kimg: float, evaluate: Callable[[torch.nn.Module, float], dict[str, float]],
                 history_path: Path, log_images: Callable[[torch.nn.Module, float], None] | None = None) -> None:
        self.every = max(1, int(round(float(every_kimg) * 1000)))
        self.evaluate = evaluate
        self.log_images = log_images
        self.history_path = Path(history_path)
        self._next: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        seen = int(pl_module.images_seen)
        self._next = (seen // self.every + 1) * self.every
        # Rank 0 reads and cuts the history; every rank must take the same decision (evaluation is collective).
        due = self._resume_history(seen, pl_module.total_images) if trainer.is_global_zero else None
        if trainer.strategy.broadcast(due, src=0):
            self._run(trainer, pl_module)

    def _resume_history(self, seen: int, total: int) -> bool:
        """Cut the history back to ``seen`` images and say whether the evaluation at ``seen`` is due and missing.

        At 0 images it is the untrained generator, the starting point of the curve. After a resume it is the
        evaluation of the checkpoint's own step if the run was killed between writing the checkpoint and
        evaluating: every evaluation of an earlier step was written before that checkpoint. Entries past ``seen``
        (evaluated after the checkpoint by the killed run) are dropped; the resumed run evaluates those steps
        again, with the same results.
        """
        lines = self.history_path.read_text().splitlines() if self.history_path.is_file() else []
        history = [json.loads(line) for line in lines if line.strip()]
        kept = [h for h in history if _images(h["kimg"]) <= seen]
        if len(kept) < len(history):
            with atomic_write(self.history_path, "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in kept)
        if any(_images(h["kimg"]) == seen for h in kept):
            return False
        last = max((_images(h["kimg"]) for h in kept), default=-1)
        # The uninterrupted run evaluated at the step that first reached a multiple of `every`, and at the last.
        return seen // self.every > last // self.every or seen >= total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seen = int(pl_module.images_seen)
        if seen >= self._next or trainer.should_stop:
            self._run(trainer, pl_module)
            self._next = (seen // self.every + 1) * self.every

    def _run(self, trainer, pl_module) -> None:
        # Every rank evaluates (the evaluator shards the seeds across an initialised process group and gathers
        # exactly); rank 0 logs and writes. Inside a fork of the random state: whatever evaluation draws (e.g.
        # eval.noise_mode=random), training draws the same numbers.
        kimg = pl_module.kimg
        with fork_random_state(pl_module.device):
            values = self.evaluate(pl_module.G_ema, kimg)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({**values, "Progress/kimg": kimg}, step=trainer.global_step)
                line = {"kimg": kimg, **values}
                with open(self.history_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
                tqdm.write("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in line.items()))
                if self.log_images is not None:
                    self.log_images(pl_module.G_ema, kimg)
        trainer.strategy.barrier()


def _images(kimg: float) -> int:
    return int(round(float(kimg) * 1000))


# --------------------------------------------------------------------------------------------------------
def read_fd_history(train_dir: Path) -> list[dict[str, Any]]:
    path = Path(train_dir) / "fd_history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_or_reuse(cfg: Any, dataset, tracker, evaluate_fn=None, images_fn=None,
                   lock_timeout: float = -1) -> Path:
    """Train the generator that ``cfg`` describes, or reuse it if its fingerprint folder is finished.

    Returns the path of the final G_ema snapshot (``final.pt``).
    """
    from fidmed.augment import build_augmentation
    from fidmed.data.datamodule import ImageDataModule
    from fidmed.gan.module import StyleGAN2Module

    fingerprint = training_fingerprint(cfg)
    train_dir = train_dir_for(cfg, fingerprint)
    train_dir.mkdir(parents=True, exist_ok=True)
    final = train_dir / "final.pt"
    if final.is_file():
        log.info("reusing trained generator %s", final)
        return final
    # DDP: the lock keeps *other jobs* out; the ranks of this job train together, so only rank 0 takes it (the
    # other ranks start while rank 0 holds it and would wait forever).
    lock = FileLock(str(train_dir / ".lock")) if launch_rank() == 0 else _NoLock()
    try:
        lock.acquire(timeout=0)
    except Exception:
        tqdm.write(f"another job is training {train_dir.name}; waiting for it to finish ...")
        lock.acquire(timeout=lock_timeout)
    try:
        if final.is_file():  # the job we waited for finished it
            log.info("reusing generator trained by a concurrent job: %s", final)
            return final
        (train_dir / "fingerprint.json").write_text(json.dumps(
            {"fingerprint": fingerprint, **fingerprint_record(cfg)}, indent=2, default=str))
        ckpt_dir = train_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume, resume_ckpt = None, None
        if last.is_file():
            resume_ckpt = _check_resumable(last, fingerprint)
            resume = str(last)
            tqdm.write(f"resuming training from {last}")

        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        augment = build_augmentation(effective_augmentation(cfg))
        module = StyleGAN2Module(cfg.model, dataset.resolution, dataset.num_channels, augment,
                                 kimg=float(cfg.schedule.kimg), log_every_steps=int(cfg.trainer.log_every_n_steps))
        callbacks: list[L.Callback] = [
            SnapshotCallback(ckpt_dir, float(cfg.schedule.checkpoint_kimg), fingerprint),
            KimgProgressBar(module.total_images),
            GradientAllReduce(),
        ]
        if evaluate_fn is not None and float(cfg.schedule.eval_kimg or 0) > 0:
            callbacks.append(PeriodicEvaluation(float(cfg.schedule.eval_kimg), evaluate_fn,
                                                train_dir / "fd_history.jsonl", images_fn))
        # Lightning's own arguments come from the trainer group (hardware); fidmed fixes the ones its training
        # loop depends on (length counted in images, its own checkpoints, progress bar and sampler).
        trainer = hydra.utils.instantiate(
            cfg.trainer, max_epochs=-1, max_steps=-1, logger=tracker.lightning_logger, callbacks=callbacks,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(train_dir), num_sanity_val_steps=0, use_distributed_sampler=False)
        # model.batch_size is the global minibatch (the study's 32); each DDP rank takes its share.
        world = int(trainer.world_size)
        if int(cfg.model.batch_size) % world:
            raise FidmedError(f"model.batch_size={cfg.model.batch_size} does not split evenly over {world} DDP ranks "
                              f"(trainer.devices x trainer.num_nodes); choose a batch size divisible by {world}.")
        datamodule = ImageDataModule(dataset, batch_size=int(cfg.model.batch_size) // world,
                                     num_workers=int(cfg.modality.num_workers), xflip=bool(cfg.modality.xflip),
                                     seed=int(cfg.seed))
        if resume_ckpt is not None and type(datamodule).__qualname__ not in resume_ckpt:
            # A checkpoint of an older fidmed has no sampler position (Lightning restores it from newer ones):
            # every rank has taken one batch per step.
            datamodule.start = int(resume_ckpt["state_dict"]["iteration"]) * datamodule.batch_size
        del resume_ckpt
        started = time.time()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        if world > 1:
            _check_ranks_agree(module)
        if trainer.is_global_zero:
            if int(module.images_seen) < module.total_images:
                raise FidmedError(f"training stopped at {module.kimg:.3f} kimg before reaching "
                                  f"{cfg.schedule.kimg} kimg; run the same command again to resume from {last}.")
            snap = module.generator_snapshot()
            snap["fingerprint"] = fingerprint
            snap["train_seconds"] = time.time() - started
            atomic_torch_save(snap, final)
        trainer.strategy.barrier()
        return final
    finally:
        lock.release()


def _check_ranks_agree(module: torch.nn.Module) -> None:
    """After DDP training every rank must hold the same G, D and G_ema (synchronised gradients, same updates);
    a float64 sum and sum of squares per network, gathered from all ranks, must agree."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    sums = torch.tensor([float(sum(p.detach().double().sum() for p in net.parameters())) for net in
                         (module.G, module.D, module.G_ema)], dtype=torch.float64)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.zeros_like(sums, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums.to(device))
    if any(not torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered):
        raise FidmedError("DDP ranks ended training with different networks (gradients were not synchronised); "
                          "train on one device (trainer=gpu) and report this with your trainer settings.")


class _NoLock:
    def acquire(self, timeout: float = -1) -> None:
        pass

    def release(self) -> None:
        pass


def _check_resumable(last: Path, fingerprint: str) -> dict[str, Any]:
    """The checkpoint ``last`` (loaded on the CPU) if it belongs to ``fingerprint``, else a FidmedError."""
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FidmedError(f"cannot read checkpoint {last} ({exc}); delete it to start this training afresh.") from None
    stored = (ckpt.get("fidmed") or {}).get("fingerprint")
    if stored != fingerprint:
        raise FidmedError(f"checkpoint {last} belongs to another training configuration (fingerprint "
                          f"{str(stored)[:12]} != {fingerprint[:12]}); delete it or restore the settings it was "
                          f"trained with.")
    return ckpt
