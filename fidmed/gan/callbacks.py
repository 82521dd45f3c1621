"""The Lightning callbacks of a training run: checkpoints and snapshots, DDP gradient averaging, a progress bar in
images, and FD evaluations during training.

Their order of writes is what makes a killed run resumable exactly: a snapshot is written before the ``last.ckpt``
that points past it, and the FD history is cut back to the resumed checkpoint (the evaluations after it are
repeated, with the same results), so no file of a killed run is missing or doubled after the resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from fidmed.atomic import atomic_write
from fidmed.gan.rng import fork_random_state
from fidmed.gan.snapshot import atomic_torch_save, snapshot_name

FD_HISTORY = "fd_history.jsonl"  # in the training folder: one JSON line per FD evaluation during training


def read_fd_history(train_dir: Path) -> list[dict]:
    """The FD evaluations a training run made, in order (``[]`` if none)."""
    path = Path(train_dir) / FD_HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    """DDP gradient averaging for the manual G/D phases, as stylegan2-ada-pytorch's training loop does it: before
    every optimiser step, the gradients of that optimiser's parameters are summed across ranks and divided by the
    world size, so every rank applies the same update. The loss's backward passes go through ``manual_backward``,
    for which Lightning prepares DDP's reducer, so the gradients arrive averaged already; averaging equal gradients
    again leaves them equal on every rank (unchanged for 2 ranks), and this guarantees the same update under any
    strategy, including one whose reducer skipped a parameter."""

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
                p.grad.copy_(flat[offset : offset + n].view_as(p))
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
            self.bar = tqdm(
                total=self.total,
                initial=min(self._last, self.total),
                unit="img",
                desc="training",
                dynamic_ncols=True,
                smoothing=0.1,
            )

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

    def __init__(
        self,
        every_kimg: float,
        evaluate: Callable[[torch.nn.Module, float], dict[str, float]],
        history_path: Path,
        log_images: Callable[[torch.nn.Module, float], None] | None = None,
    ) -> None:
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
                tqdm.write(
                    "  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items())
                )
                if self.log_images is not None:
                    self.log_images(pl_module.G_ema, kimg)
        trainer.strategy.barrier()


def _images(kimg: float) -> int:
    return int(round(float(kimg) * 1000))
