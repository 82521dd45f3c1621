"""Training orchestration: a fingerprinted training folder, its lock, checks before any work, resume, and the run.

A training run is identified by its fingerprint (:mod:`fidmed.gan.fingerprint`). Its folder
``<train_root>/<modality>-<augmentation>-<fingerprint[:12]>/`` holds ``checkpoints/last.ckpt`` (full state, for
resume), ``checkpoints/network-snapshot-*.pt`` (G_ema, for evaluation), ``final.pt`` once training finished,
``fd_history.jsonl`` and ``fingerprint.json``. Jobs that differ only in evaluation settings (``-m extractor=a,b``)
compute the same fingerprint and reuse one generator; a job that finds another one training the same generator
waits on the folder's lock instead of training it twice. A crashed run resumes from ``last.ckpt``.

Resuming is exact: ``last.ckpt`` holds, besides the weights, optimiser moments and counters, every rank's training
random stream (:mod:`fidmed.gan.rng`) and the sampler's position (:class:`fidmed.data.datamodule.ImageDataModule`),
so a run killed at any point and started again writes the same snapshots, ``final.pt`` and FD history as a run
that was never interrupted (bitwise on the same machine and software with the same thread count; see the README).
The order of writes that makes this hold is the callbacks' (:mod:`fidmed.gan.callbacks`).

Before anything is created, :func:`check_training` refuses what would fail later with a library's traceback: a
GPU trainer without a visible GPU, ``model.compile=true`` without what torch.compile needs (a C++ compiler on the
CPU, Triton on CUDA), a training folder that cannot be written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from filelock import FileLock
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fidmed.atomic import check_writable
from fidmed.errors import FidmedError
from fidmed.gan.callbacks import (
    FD_HISTORY,
    GradientAllReduce,
    KimgProgressBar,
    PeriodicEvaluation,
    SnapshotCallback,
    read_fd_history,
)
from fidmed.gan.fingerprint import effective_augmentation, fingerprint_record, train_dir_for, training_fingerprint
from fidmed.gan.snapshot import atomic_torch_save

# What a job needs from training (the fingerprint's and the FD history's own modules define the last three).
__all__ = [
    "check_training",
    "launch_rank",
    "train_or_reuse",
    "read_fd_history",
    "train_dir_for",
    "training_fingerprint",
]

log = logging.getLogger(__name__)

_GPU_ACCELERATORS = ("gpu", "cuda")


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
# Checks before any work.
def check_trainer_hardware(trainer_cfg: Any) -> None:
    """A GPU trainer needs visible CUDA devices, as many as ``trainer.devices`` asks for (else Lightning stops with
    a MisconfigurationException traceback after the job has started)."""
    accelerator = str(trainer_cfg.get("accelerator", "cpu")).lower()
    if accelerator not in _GPU_ACCELERATORS:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise FidmedError(
            f"trainer.accelerator={accelerator} (trainer=gpu or trainer=ddp) but no CUDA device is "
            f"visible (torch.cuda.is_available() is False); use trainer=cpu (for DDP on CPUs: "
            f"trainer=ddp trainer.accelerator=cpu), or run where a GPU and a CUDA build of torch are."
        )
    devices = trainer_cfg.get("devices", 1)
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    wanted = max(devices) + 1 if isinstance(devices, (list, tuple)) and devices else devices
    if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > visible:
        raise FidmedError(
            f"trainer.devices={devices} but only {visible} CUDA device(s) are visible; set "
            f"trainer.devices={visible} (or fewer), or run where more GPUs are."
        )


def check_train_dir_writable(train_dir: Path) -> None:
    """Refuse a training folder that cannot be created or written, without creating anything (a file is really
    created and removed in its nearest existing parent: permission bits do not stop root, read-only mounts do)."""
    check_writable(
        train_dir,
        "the training folder",
        is_dir=True,
        fix="set paths.train_root to a writable folder (e.g. paths.train_root=$HOME/fidmed/train) or make it writable",
    )


def check_compile(model_cfg: Any, trainer_cfg: Any) -> None:
    """``model.compile=true`` needs what torch.compile's inductor generates kernels with: a C++ compiler for the CPU,
    Triton for CUDA (else the first training step fails deep inside torch with a long traceback)."""
    if not bool(model_cfg.get("compile", False)):
        return
    import torch._dynamo

    off = "or train without it (model.compile=false: the same training at eager speed)"
    if not torch._dynamo.is_dynamo_supported():
        raise FidmedError(
            f"model.compile=true: torch.compile is not supported with this Python/torch ({sys.version.split()[0]}, "
            f"torch {torch.__version__}); use a Python version your torch supports for torch.compile, {off}."
        )
    accelerator = str(trainer_cfg.get("accelerator", "cpu")).lower()
    if accelerator in _GPU_ACCELERATORS:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise FidmedError(
                f"model.compile=true on CUDA needs Triton, which is not installed; pip install triton (the version "
                f"your torch {torch.__version__} pins), {off}."
            )
        return
    if not _find_cxx():
        raise FidmedError(
            "model.compile=true on the CPU needs a C++ compiler for torch.compile's generated kernels and none was "
            f"found (g++, or $CXX); install one (Debian/Ubuntu: apt-get install g++), {off}."
        )


def _find_cxx() -> str | None:
    """The C++ compiler inductor would use, or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # private: its location varies between versions
    except ImportError:
        name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        return shutil.which(name)
    try:
        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 -- torch raises its own InvalidCxxCompiler (and others by version)
        return None


def check_training(cfg: Any) -> Path | None:
    """What training ``cfg`` needs before any work starts: a visible GPU for a GPU trainer, what ``model.compile``
    needs, and a writable training folder. Returns the finished generator (``final.pt``) when there is one to reuse
    (nothing to check then, and nothing is written), else None."""
    final = train_dir_for(cfg) / "final.pt"
    if final.is_file():
        return final
    check_trainer_hardware(cfg.trainer)
    check_compile(cfg.model, cfg.trainer)
    check_train_dir_writable(final.parent)
    return None


# --------------------------------------------------------------------------------------------------------
def train_or_reuse(cfg: Any, dataset, tracker, evaluate_fn=None, images_fn=None, lock_timeout: float = -1) -> Path:
    """Train the generator that ``cfg`` describes, or reuse it if its fingerprint folder is finished.

    Returns the path of the final G_ema snapshot (``final.pt``).
    """
    from fidmed.data.datamodule import ImageDataModule
    from fidmed.gan.module import StyleGAN2Module

    fingerprint = training_fingerprint(cfg)
    train_dir = train_dir_for(cfg, fingerprint)
    final = train_dir / "final.pt"
    reusable = check_training(cfg)
    if reusable is not None:
        log.info("reusing trained generator %s", reusable)
        return reusable
    train_dir.mkdir(parents=True, exist_ok=True)
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
        (train_dir / "fingerprint.json").write_text(
            json.dumps({"fingerprint": fingerprint, **fingerprint_record(cfg)}, indent=2, default=str)
        )
        ckpt_dir = train_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume, resume_ckpt = None, None
        if last.is_file():
            resume_ckpt = _check_resumable(last, fingerprint)
            resume = str(last)
            tqdm.write(f"resuming training from {last}")

        # The seed of the networks' initialisation and of the first training stream (under DDP every rank's stream
        # is seeded seed * world_size + rank when training starts, see StyleGAN2Module.on_train_start).
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        module = StyleGAN2Module(
            cfg.model,
            dataset.resolution,
            dataset.num_channels,
            effective_augmentation(cfg),
            kimg=float(cfg.schedule.kimg),
            log_every_steps=int(cfg.trainer.log_every_n_steps),
            seed=int(cfg.seed),
        )
        callbacks: list[L.Callback] = [
            SnapshotCallback(ckpt_dir, float(cfg.schedule.checkpoint_kimg), fingerprint),
            KimgProgressBar(module.total_images),
            GradientAllReduce(),
        ]
        if evaluate_fn is not None and float(cfg.schedule.eval_kimg or 0) > 0:
            callbacks.append(
                PeriodicEvaluation(float(cfg.schedule.eval_kimg), evaluate_fn, train_dir / FD_HISTORY, images_fn)
            )
        # Lightning's own arguments come from the trainer group (hardware); fidmed fixes the ones its training
        # loop depends on (length counted in images, its own checkpoints, progress bar and sampler).
        trainer = hydra.utils.instantiate(
            cfg.trainer,
            max_epochs=-1,
            max_steps=-1,
            logger=tracker.lightning_logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(train_dir),
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
        # model.batch_size is the global minibatch (the study's 32); each DDP rank takes its share.
        world = int(trainer.world_size)
        if int(cfg.model.batch_size) % world:
            raise FidmedError(
                f"model.batch_size={cfg.model.batch_size} does not split evenly over {world} DDP ranks "
                f"(trainer.devices x trainer.num_nodes); choose a batch size divisible by {world}."
            )
        datamodule = ImageDataModule(
            dataset,
            batch_size=int(cfg.model.batch_size) // world,
            num_workers=int(cfg.modality.num_workers),
            xflip=bool(cfg.modality.xflip),
            seed=int(cfg.seed),
        )
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
                raise FidmedError(
                    f"training stopped at {module.kimg:.3f} kimg before reaching "
                    f"{cfg.schedule.kimg} kimg; run the same command again to resume from {last}."
                )
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
    sums = torch.tensor(
        [float(sum(p.detach().double().sum() for p in net.parameters())) for net in (module.G, module.D, module.G_ema)],
        dtype=torch.float64,
    )
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.zeros_like(sums, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums.to(device))
    if any(not torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered):
        raise FidmedError(
            "DDP ranks ended training with different networks (gradients were not synchronised); "
            "train on one device (trainer=gpu) and report this with your trainer settings."
        )


class _NoLock:
    def acquire(self, timeout: float = -1) -> None:
        pass

    def release(self) -> None:
        pass


def _check_resumable(last: Path, fingerprint: str) -> dict[str, Any]:
    """The checkpoint ``last`` (loaded on the CPU, tensors and plain values only) if it belongs to ``fingerprint``,
    else a FidmedError."""
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- damaged, truncated or not a fidmed checkpoint
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FidmedError(
            f"cannot read checkpoint {last} ({detail}); delete it to start this training afresh."
        ) from None
    stored = (ckpt.get("fidmed") or {}).get("fingerprint") if isinstance(ckpt, dict) else None
    if stored != fingerprint:
        raise FidmedError(
            f"checkpoint {last} belongs to another training configuration (fingerprint "
            f"{str(stored)[:12]} != {fingerprint[:12]}); delete it or restore the settings it was "
            f"trained with."
        )
    return ckpt
