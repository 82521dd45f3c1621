"""StyleGAN2 training as a LightningModule with manual optimisation.

One ``training_step`` is one iteration of stylegan2-ada-pytorch's training loop:

1. the real minibatch (uint8 from the datamodule) becomes ``x = uint8 / 127.5 - 1``;
2. the phases G main, G reg (every ``g_reg_interval`` steps), D main, D reg (every ``d_reg_interval``) each
   zero their optimiser, accumulate gradients over chunks of ``batch_chunk`` images with ``gain = interval``,
   replace NaN/Inf gradients (as the reference does) and step (:meth:`StyleGAN2Module.run_phase`);
3. the generator EMA is updated with ``beta = 0.5 ** (batch / (ema_kimg * 1000))``;
4. the augmentation sees D's real logits and adjusts its probability (ADA/APA) after the minibatch.

Lazy regularisation scales each optimiser as the reference does: ``lr * r`` and ``betas ** r`` with
``r = interval / (interval + 1)``.

``model.compile=true`` runs G main and D main through ``torch.compile`` twins of G and D (sharing their
parameters) and the R1 and path-length phases eagerly, which AOTAutograd cannot differentiate twice (see
:mod:`fidmed.gan.loss`).

Each phase draws its own latents, as the reference does. Gradients of a phase are averaged over its chunks
(the reference sums chunk means on one GPU and averages across GPUs; Adam is invariant to the constant factor,
so this only matters for ``eps``). The minibatch-std groups stay ``mbstd_group`` images whatever the chunk.

Training length is counted in images shown to D (``images_seen``, a buffer, so it is saved and restored with
every checkpoint); the step that reaches ``kimg * 1000`` ends training.

Every random number a step draws comes from the module's :class:`fidmed.gan.rng.RandomStream` (one per DDP rank),
whose position is written into every checkpoint (``checkpoint["fidmed_random"]``, all ranks' positions gathered
into rank 0's file) and restored on resume, so a resumed run draws what the uninterrupted run drew. Together with
the weights, optimiser moments, EMA, ``pl_mean``, the augmentation's ``p`` and controller (all in the state dict)
and the sampler's position (:class:`fidmed.data.datamodule.ImageDataModule`), the checkpoint holds everything a
step depends on. Under DDP each rank's stream starts from ``seed * world_size + rank`` (as stylegan2-ada-pytorch
seeds its ranks), so the ranks draw different latents, noise and augmentations for their shares of the minibatch;
a single process continues the generators seeded with ``seed`` (= ``seed * 1 + 0``) after the networks'
initialisation, exactly as before ranks had streams of their own.

Lightning as intended: every backward pass goes through :meth:`~lightning.pytorch.LightningModule.manual_backward`
(the loss calls it), so the precision plugin and the strategy (DDP's gradient reducer) see each one; the
constructor's arguments are saved as hyperparameters (plain values; the augmentation by its options, see
:func:`fidmed.augment.augmentation_options`), so ``StyleGAN2Module.load_from_checkpoint("last.ckpt")`` rebuilds
the module with its state.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from fidmed.augment import augmentation_options, build_augmentation
from fidmed.gan.loss import StyleGAN2Loss
from fidmed.gan.networks import build_networks
from fidmed.gan.rng import RandomStream
from fidmed.gan.snapshot import SNAPSHOT_FORMAT

log = logging.getLogger(__name__)

RANDOM_STATE_KEY = "fidmed_random"  # where checkpoints keep the training random streams


@dataclass(frozen=True)
class Phase:
    name: str  # 'Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth'
    module: str  # 'G' or 'D'
    interval: int


def training_phases(g_reg_interval: int | None, d_reg_interval: int | None) -> list[Phase]:
    """The phases of one iteration, as stylegan2-ada-pytorch's training loop sets them up."""
    phases: list[Phase] = []
    for module, interval in (("G", g_reg_interval), ("D", d_reg_interval)):
        if not interval:
            phases.append(Phase(module + "both", module, 1))
        else:
            phases += [Phase(module + "main", module, 1), Phase(module + "reg", module, int(interval))]
    return phases


def network_kwargs(model_cfg: Any, resolution: int, channels: int) -> dict[str, Any]:
    """Arguments of :func:`fidmed.gan.networks.build_networks` from the ``model`` config group."""
    return dict(
        resolution=int(resolution),
        channels=int(channels),
        z_dim=int(model_cfg.z_dim),
        w_dim=int(model_cfg.w_dim),
        mapping_layers=int(model_cfg.mapping_layers),
        channel_base=int(model_cfg.channel_base),
        channel_max=int(model_cfg.channel_max),
        num_fp16_res=int(model_cfg.num_fp16_res),
        conv_clamp=None if model_cfg.conv_clamp is None else float(model_cfg.conv_clamp),
        mbstd_group=int(model_cfg.mbstd_group),
    )


def _plain_mapping(cfg: Any, what: str) -> dict[str, Any]:
    """A DictConfig or mapping as a plain dict (hyperparameters must load with ``torch.load(weights_only=True)``)."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"{what} must be a mapping or a DictConfig, got {type(cfg).__name__}")


class StyleGAN2Module(L.LightningModule):
    """G, D, G_ema, the loss and the augmentation; see the module docstring for one step.

    Args:
        model_cfg: the ``model`` config group (a DictConfig or a mapping).
        resolution, channels: the images'.
        augmentation: the augmentation's config (its config dataclass, a DictConfig or a mapping with ``name``;
            None = ``noaug``), built with :func:`fidmed.augment.build_augmentation`.
        kimg: training length, thousands of images shown to D.
        log_every_steps: log losses and augmentation statistics every that many steps.
        seed: the training seed; under DDP rank ``r`` of ``w`` draws from ``seed * w + r`` (see the module docstring).
    """

    def __init__(
        self,
        model_cfg: Any,
        resolution: int,
        channels: int,
        augmentation: Any = None,
        kimg: float = 1.0,
        log_every_steps: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        plain_model = _plain_mapping(model_cfg, "model_cfg")
        augmentation = augmentation_options(augmentation)
        # Plain values only (last.ckpt stays readable with torch.load(weights_only=True)); not sent to the logger,
        # which has the whole job configuration already.
        self.save_hyperparameters(
            {
                "model_cfg": plain_model,
                "resolution": int(resolution),
                "channels": int(channels),
                "augmentation": augmentation,
                "kimg": float(kimg),
                "log_every_steps": int(log_every_steps),
                "seed": int(seed),
            },
            logger=False,
        )
        self.model_cfg = model_cfg = OmegaConf.create(plain_model)
        self.seed = int(seed)
        self.net_kwargs = network_kwargs(model_cfg, resolution, channels)
        self.G, self.D = build_networks(**self.net_kwargs)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.augment = build_augmentation(augmentation)
        self.loss = StyleGAN2Loss(
            self.G,
            self.D,
            augment_pipe=self.augment,
            style_mixing_prob=float(model_cfg.style_mixing_prob),
            r1_gamma=float(model_cfg.r1_gamma),
            pl_batch_shrink=int(model_cfg.pl_batch_shrink),
            pl_decay=float(model_cfg.pl_decay),
            pl_weight=float(model_cfg.pl_weight),
            backward=self._backward,
            compile=bool(model_cfg.get("compile", False)),  # hyperparameters of older checkpoints lack it
        )
        self.phases = training_phases(model_cfg.g_reg_interval, model_cfg.d_reg_interval)
        self.batch_size = int(model_cfg.batch_size)
        self.batch_chunk = int(model_cfg.batch_chunk or self.batch_size)
        self.total_images = int(round(float(kimg) * 1000))
        self.log_every_steps = max(1, int(log_every_steps))
        self.register_buffer("images_seen", torch.zeros([], dtype=torch.int64))
        self.register_buffer("iteration", torch.zeros([], dtype=torch.int64))
        self.random_stream = RandomStream()  # this rank's training random numbers (saved with checkpoints)
        self._saved_streams: list[Any] | None = None  # every rank's, from the checkpoint being resumed

    # ----------------------------------------------------------------------------------------------------
    @property
    def kimg(self) -> float:
        return float(self.images_seen) / 1000.0

    def configure_optimizers(self):
        cfg = self.model_cfg
        optimizers = []
        for module, lr, interval in ((self.G, cfg.lr_g, cfg.g_reg_interval), (self.D, cfg.lr_d, cfg.d_reg_interval)):
            ratio = interval / (interval + 1) if interval else 1.0
            betas = tuple(float(b) ** ratio for b in cfg.betas)
            optimizers.append(
                torch.optim.Adam(module.parameters(), lr=float(lr) * ratio, betas=betas, eps=float(cfg.eps))
            )
        return optimizers

    def on_train_start(self) -> None:
        # The networks train in train mode; G_ema only ever runs inference.
        self.G_ema.eval()
        self._start_random_stream(self.global_rank, self.trainer.world_size)
        if int(self.images_seen) >= self.total_images:
            # Resumed from the checkpoint of the last step (the run was killed before it wrote final.pt): nothing
            # is left to train, and one more step would make a generator the uninterrupted run never made.
            self.trainer.should_stop = True

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        with self.random_stream.active(batch.device):
            self._training_step(batch)

    def _training_step(self, batch: torch.Tensor) -> None:
        opt_g, opt_d = self.optimizers()
        optimizers = {"G": opt_g, "D": opt_d}
        real = batch.to(torch.float32) / 127.5 - 1
        batch_size = real.shape[0]
        iteration = int(self.iteration)
        logs: dict[str, float] = {}

        for phase in self.phases:
            if iteration % phase.interval != 0:
                continue
            gen_z = torch.randn([batch_size, self.G.z_dim], device=real.device)
            logs.update(self.run_phase(phase, optimizers[phase.module], real, gen_z))

        # Under DDP each rank holds batch/world images; EMA and kimg count the whole minibatch, as the
        # reference does.
        global_batch = batch_size * self.trainer.world_size
        self._update_ema(global_batch)
        self.images_seen += global_batch
        self.iteration += 1
        self.augment.end_minibatch(batch_size)  # this rank's images; the controller all-reduces across ranks

        if iteration % self.log_every_steps == 0:
            logs.update(self.augment.stats())
            logs["Progress/kimg"] = self.kimg
            self.log_dict(logs, on_step=True, prog_bar=False, logger=bool(self.trainer.loggers), batch_size=batch_size)
        if int(self.images_seen) >= self.total_images:
            self.trainer.should_stop = True

    def run_phase(
        self, phase: Phase, optimizer: torch.optim.Optimizer, real: torch.Tensor, gen_z: torch.Tensor
    ) -> dict[str, float]:
        """One phase of an iteration on this rank's images ``real`` (in [-1, 1]) with the latents ``gen_z``: zero the
        optimiser, accumulate the gradients of every chunk of ``batch_chunk`` images, replace NaN/Inf gradients and
        step; returns the loss statistics. ``optimizer`` is the phase's network's (:meth:`configure_optimizers`)."""
        network = self.G if phase.module == "G" else self.D
        c = torch.zeros([real.shape[0], 0], device=real.device)
        chunks = list(zip(real.split(self.batch_chunk), gen_z.split(self.batch_chunk), c.split(self.batch_chunk)))
        logs: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        network.requires_grad_(True)
        for real_img, z, cc in chunks:
            if phase.module == "D":
                real_img = self.augment.replace_reals(real_img, self._make_fakes)
            out = self.loss.accumulate_gradients(
                phase=phase.name, real_img=real_img, real_c=cc, gen_z=z, gen_c=cc, gain=phase.interval / len(chunks)
            )
            if "real_logits" in out:
                self.augment.observe_real_logits(out.pop("real_logits"))
            for key, value in out.items():
                logs[key] = float(value)
        network.requires_grad_(False)
        for param in network.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        return logs

    def _backward(self, loss: torch.Tensor) -> None:
        """The loss's backward passes: Lightning's ``manual_backward`` in training; ``Tensor.backward`` for a module
        that no trainer runs (benchmarks/train.py times :meth:`run_phase` alone)."""
        if self._trainer is None and getattr(self, "_fabric", None) is None:
            loss.backward()
        else:
            self.manual_backward(loss)

    @torch.no_grad()
    def _make_fakes(self, n: int) -> torch.Tensor:
        """Detached generated images for APA (``Augmentation.replace_reals``)."""
        z = torch.randn([n, self.G.z_dim], device=self.images_seen.device)
        c = torch.zeros([n, 0], device=z.device)
        return self.G(z, c).detach()

    @torch.no_grad()
    def _update_ema(self, batch_size: int) -> None:
        ema_nimg = float(self.model_cfg.ema_kimg) * 1000
        if self.model_cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, float(self.images_seen) * float(self.model_cfg.ema_rampup))
        beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # ----------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's random-stream position, gathered into the checkpoint (only rank 0 writes the file)."""
        state = self.random_stream.state_dict()
        world = self.trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * world
            torch.distributed.all_gather_object(ranks, state)
        else:
            ranks = [state]
        checkpoint[RANDOM_STATE_KEY] = {"world_size": len(ranks), "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's random streams; rank 0's is this module's until training starts, when each rank
        takes its own (:meth:`on_train_start`: only then are the rank and the world size known)."""
        record = checkpoint.get(RANDOM_STATE_KEY)
        self._saved_streams = list(record["ranks"]) if record and record.get("ranks") else []
        self.random_stream.load_state_dict(self._saved_streams[0] if self._saved_streams else None)

    def _start_random_stream(self, rank: int, world: int) -> None:
        """This rank's stream for the steps to come: the checkpoint's when resuming, else (DDP) a fresh one."""
        saved, self._saved_streams = self._saved_streams, None
        if saved is not None and not saved:
            log.warning(
                "the checkpoint holds no random state (written by an older fidmed): training continues "
                "from it, but draws other latents, noise and augmentations than the run it resumes would "
                "have; the result is not bitwise that run."
            )
        elif saved:
            if len(saved) != world:
                log.warning(
                    "the checkpoint was written by %d DDP rank(s) and is resumed by %d: rank %d continues "
                    "the random stream of rank %d; the result is not bitwise an uninterrupted run.",
                    len(saved),
                    world,
                    rank,
                    rank % len(saved),
                )
            self.random_stream.load_state_dict(saved[rank % len(saved)])
        if world > 1 and self.random_stream.state is None:
            # A fresh DDP run (or one resumed from a checkpoint without random state): rank r of w draws from
            # seed * w + r, as stylegan2-ada-pytorch seeds its ranks.
            self.random_stream.seed(self.seed * world + rank, self.device)

    def generator_snapshot(self) -> dict[str, Any]:
        """What evaluation needs of the trained model: G_ema's weights and how to build it.

        Only tensors and plain Python values, so that ``torch.load(..., weights_only=True)`` reads it back
        without executing anything.
        """
        return {
            "format": SNAPSHOT_FORMAT,
            "G_ema": {k: v.detach().cpu() for k, v in self.G_ema.state_dict().items()},
            "network_kwargs": dict(self.net_kwargs),
            "kimg": self.kimg,
            "images_seen": int(self.images_seen),
        }
