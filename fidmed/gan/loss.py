"""The StyleGAN2 loss: non-saturating logistic loss, R1 and path-length regularisation, style mixing.

Re-implements stylegan2-ada-pytorch's ``training/loss.py`` (``StyleGAN2Loss``) without its DDP and
``training_stats`` plumbing: ``accumulate_gradients`` runs one phase, runs its backward passes itself (so gradients
accumulate over calls, as the reference's per-GPU rounds do) and returns detached scalars for logging. Each backward
pass goes through the ``backward`` callable the loss was given: the LightningModule passes its ``manual_backward``,
so Lightning's precision plugin and strategy see every one; alone, the loss calls ``Tensor.backward``.

Phases (the training loop picks them; "lazy regularisation" runs the 'reg' phases every k-th minibatch with
``gain = k``):

- 'Gmain': ``softplus(-D(G(z)))``.
- 'Greg': path-length penalty ``(|J^T y| - a)^2 * pl_weight`` on ``batch / pl_batch_shrink`` samples, where J is
  the Jacobian of the image w.r.t. the w latents, y unit-variance image noise and ``a`` the running mean
  ``pl_mean`` of the lengths.
- 'Dmain': ``softplus(D(G(z))) + softplus(-D(x))``.
- 'Dreg': R1 penalty ``|grad_x D(x)|^2 * r1_gamma / 2`` on real images.
- 'Gboth', 'Dboth': main and reg in one call.

Every image D sees passes through ``augment_pipe`` first. R1 differentiates D's output with respect to the
real image *before* augmentation, through the augmentation (create_graph=True, a double backward), which is
what the reference does and what makes R1 correct under ADA.

Compiled path (``compile=True``, the config's ``model.compile``): G's mapping and synthesis networks and D are
also wrapped by ``torch.compile`` (:func:`compile_networks`), sharing their parameters and buffers with the eager
modules. AOTAutograd, which compiled modules train through, cannot differentiate twice, so the compiled modules
run every forward pass whose graph is differentiated once: G main, D main's generated images and, when R1 is not
computed in the same pass, D main's real images. The path-length and R1 passes (``create_graph=True``) run the
same modules eagerly. Inductor keeps the eager random number generator (``fallback_random``), so the noise
inputs are the same draws as in eager mode; the fused kernels round differently, so compiled and eager results
are close, not bit for bit (tests/test_compile.py states the tolerances for tiny networks; at 64-256 px the
largest deviations, in the gradients of scalars and biases summed over every pixel of the last blocks, reach
6e-4 to 3e-3 of such a tensor's largest gradient: benchmarks/compile_grads.py, benchmarks/results/train.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fidmed.gan.networks import Discriminator, Generator

PHASES = ("Gmain", "Greg", "Gboth", "Dmain", "Dreg", "Dboth")


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily stop ``module``'s parameters from requiring gradients, then restore each flag.

    The reference training loop freezes the network that is not being trained; doing it here keeps the G
    phases from writing gradients into D and the D phases from building a graph through G, whatever the caller
    did.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _head(c: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if c is None else c[:n]


class CompiledNetworks(NamedTuple):
    """``torch.compile`` wrappers of G's mapping and synthesis networks and of D (sharing their parameters)."""

    mapping: Callable[..., torch.Tensor]
    synthesis: Callable[..., torch.Tensor]
    D: Callable[..., torch.Tensor]


#: Inductor options of the compiled path: draw random numbers (the synthesis layers' noise inputs) with the eager
#: generator, so that compiled and eager training consume the same random stream and draw the same noise.
INDUCTOR_OPTIONS = {"fallback_random": True}


def compile_networks(G: Generator, D: Discriminator, backend: str = "inductor") -> CompiledNetworks:
    """Compiled twins of ``G.mapping``, ``G.synthesis`` and ``D`` (compilation happens at their first call).

    G is compiled as its two networks because style mixing, between them, indexes with a random tensor. Shapes
    are specialised (``dynamic=False``): training calls them with one chunk size. ``backend`` is torch.compile's
    (``inductor`` generates fused kernels; tests also use ``aot_eager``, which only traces).
    """
    options = dict(INDUCTOR_OPTIONS) if backend == "inductor" else None

    def compiled(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        return torch.compile(module, backend=backend, dynamic=False, options=options)

    return CompiledNetworks(compiled(G.mapping), compiled(G.synthesis), compiled(D))


class StyleGAN2Loss(torch.nn.Module):
    """StyleGAN2 losses for a ``Generator`` G and ``Discriminator`` D.

    An ``nn.Module`` only to own the buffer ``pl_mean`` (the running mean of path lengths), so that checkpoints
    and ``.to(device)`` carry it: register this object as a submodule of the training module. G, D and
    ``augment_pipe`` are held as plain references, not submodules, so they do not appear twice in a state dict.

    ``augment_pipe`` is any differentiable callable on image batches (or None). The network being trained must
    have ``requires_grad=True`` parameters; the other one is frozen for the duration of each call. ``backward``
    runs each backward pass of a scalar loss (None: ``loss.backward()``; a LightningModule passes its
    ``manual_backward``). ``compile`` selects the compiled path (see the module docstring): True compiles with
    inductor, a string names another ``torch.compile`` backend.
    """

    def __init__(
        self,
        G: Generator,
        D: Discriminator,
        augment_pipe: Callable[[torch.Tensor], torch.Tensor] | None = None,
        style_mixing_prob: float = 0.9,
        r1_gamma: float = 8.2,
        pl_batch_shrink: int = 2,
        pl_decay: float = 0.01,
        pl_weight: float = 2.0,
        backward: Callable[[torch.Tensor], None] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self._refs = (G, D, augment_pipe)  # a tuple: nn.Module does not register what is inside it
        # A NamedTuple too: the compiled wrappers stay out of the state dict (they hold G's and D's own parameters).
        self._compiled = None
        if compile:
            self._compiled = compile_networks(G, D) if compile is True else compile_networks(G, D, str(compile))
        self._backward = backward
        self.style_mixing_prob = style_mixing_prob
        self.r1_gamma = r1_gamma
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_weight = pl_weight
        self.register_buffer("pl_mean", torch.zeros([]))

    @property
    def G(self) -> Generator:
        return self._refs[0]

    @property
    def D(self) -> Discriminator:
        return self._refs[1]

    @property
    def augment_pipe(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._refs[2]

    @property
    def compiled(self) -> bool:
        """Whether the passes that are differentiated once run compiled (see the module docstring)."""
        return self._compiled is not None

    def backward(self, loss: torch.Tensor) -> None:
        """One backward pass of the scalar ``loss``, accumulating into the trained network's ``.grad``."""
        if self._backward is None:
            loss.backward()
        else:
            self._backward(loss)

    # -----------------------------------------------------------------------------------------------------------------

    def run_G(
        self, z: torch.Tensor, c: torch.Tensor | None, compiled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate images with style mixing; return (images, ws).

        With probability ``style_mixing_prob`` the ws from a uniformly drawn index in [1, num_ws) on come from a
        second, independent z (without updating ``w_avg``). The random draws happen in the reference's order.
        ``compiled``: run the compiled networks, when the loss has them (only for graphs differentiated once).
        """
        mapping, synthesis = (
            (self._compiled.mapping, self._compiled.synthesis)
            if compiled and self._compiled is not None
            else (self.G.mapping, self.G.synthesis)
        )
        ws = mapping(z, c)
        if self.style_mixing_prob > 0:
            num_ws = ws.shape[1]
            cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, num_ws)
            mix = torch.rand([], device=ws.device) < self.style_mixing_prob
            cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, num_ws))
            ws[:, cutoff:] = mapping(torch.randn_like(z), c, skip_w_avg_update=True)[:, cutoff:]
        return synthesis(ws), ws

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None, compiled: bool = False) -> torch.Tensor:
        """D's logits for (augmented) images; ``compiled`` as in :meth:`run_G`."""
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        D = self._compiled.D if compiled and self._compiled is not None else self.D
        return D(img, c)

    # -----------------------------------------------------------------------------------------------------------------

    def accumulate_gradients(
        self,
        phase: str,
        real_img: torch.Tensor,
        real_c: torch.Tensor | None,
        gen_z: torch.Tensor,
        gen_c: torch.Tensor | None,
        gain: float,
    ) -> dict[str, torch.Tensor]:
        """Run one phase, accumulate ``gain``-scaled gradients into the trained network, return statistics.

        Returned (only those the phase computes), all detached: 'Loss/G/loss', 'Loss/G/reg', 'Loss/pl_penalty',
        'Loss/D/loss', 'Loss/D/reg', 'Loss/r1_penalty', 'Loss/scores/fake', 'Loss/signs/fake',
        'Loss/scores/real', 'Loss/signs/real' (batch means) and 'real_logits' (``[N, 1]``, for ADA's controller).
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; use one of {PHASES}")
        do_Gmain = phase in ("Gmain", "Gboth")
        do_Dmain = phase in ("Dmain", "Dboth")
        do_Gpl = phase in ("Greg", "Gboth") and self.pl_weight != 0
        do_Dr1 = phase in ("Dreg", "Dboth") and self.r1_gamma != 0
        stats: dict[str, torch.Tensor] = {}

        if do_Gmain or do_Gpl:
            with _frozen(self.D):
                if do_Gmain:
                    self._generator_main(gen_z, gen_c, gain, stats)
                if do_Gpl:
                    self._path_length(gen_z, gen_c, gain, stats)
        if do_Dmain or do_Dr1:
            with _frozen(self.G):
                self._discriminator(real_img, real_c, gen_z, gen_c, gain, do_Dmain, do_Dr1, stats)
        return stats

    def _generator_main(
        self, gen_z: torch.Tensor, gen_c: torch.Tensor | None, gain: float, stats: dict[str, torch.Tensor]
    ) -> None:
        """Gmain: make D call the generated images real."""
        gen_img, _ = self.run_G(gen_z, gen_c, compiled=True)
        gen_logits = self.run_D(gen_img, gen_c, compiled=True)
        loss = F.softplus(-gen_logits)  # -log(sigmoid(logits))
        self.backward(loss.mean().mul(gain))
        stats["Loss/scores/fake"] = gen_logits.detach().mean()
        stats["Loss/signs/fake"] = gen_logits.detach().sign().mean()
        stats["Loss/G/loss"] = loss.detach().mean()

    def _path_length(
        self, gen_z: torch.Tensor, gen_c: torch.Tensor | None, gain: float, stats: dict[str, torch.Tensor]
    ) -> None:
        """Greg: keep |J^T y| (image change per unit change of w, in a random image direction) constant."""
        batch_size = gen_z.shape[0] // self.pl_batch_shrink
        gen_img, gen_ws = self.run_G(gen_z[:batch_size], _head(gen_c, batch_size))
        # Noise scaled so that the expected length does not depend on the image resolution.
        pl_noise = torch.randn_like(gen_img) / math.sqrt(gen_img.shape[2] * gen_img.shape[3])
        (pl_grads,) = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()], inputs=[gen_ws], create_graph=True)
        pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
        if self.pl_mean.device != pl_lengths.device:
            self.pl_mean = self.pl_mean.to(pl_lengths.device)
        pl_mean = self.pl_mean.lerp(pl_lengths.mean(), self.pl_decay)
        self.pl_mean.copy_(pl_mean.detach())
        pl_penalty = (pl_lengths - pl_mean).square()
        loss = pl_penalty * self.pl_weight
        # `gen_img[:, 0, 0, 0] * 0` ties every synthesis parameter into the graph (the reference needs this for
        # DDP's gradient sync); it changes no value.
        self.backward((gen_img[:, 0, 0, 0] * 0 + loss).mean().mul(gain))
        stats["Loss/pl_penalty"] = pl_penalty.detach().mean()
        stats["Loss/G/reg"] = loss.detach().mean()

    def _discriminator(
        self,
        real_img: torch.Tensor,
        real_c: torch.Tensor | None,
        gen_z: torch.Tensor,
        gen_c: torch.Tensor | None,
        gain: float,
        do_Dmain: bool,
        do_Dr1: bool,
        stats: dict[str, torch.Tensor],
    ) -> None:
        """Dmain and/or Dreg: call generated images fake and real images real; penalise D's gradient on reals."""
        loss_Dgen = None
        if do_Dmain:
            gen_img, _ = self.run_G(gen_z, gen_c, compiled=True)
            gen_logits = self.run_D(gen_img, gen_c, compiled=True)
            loss_Dgen = F.softplus(gen_logits)  # -log(1 - sigmoid(logits))
            self.backward(loss_Dgen.mean().mul(gain))
            stats["Loss/scores/fake"] = gen_logits.detach().mean()
            stats["Loss/signs/fake"] = gen_logits.detach().sign().mean()

        # R1 differentiates with respect to the real images as they enter, before augmentation.
        real_img_tmp = real_img.detach().requires_grad_(do_Dr1)
        real_logits = self.run_D(real_img_tmp, real_c, compiled=not do_Dr1)  # R1 differentiates this pass twice
        stats["Loss/scores/real"] = real_logits.detach().mean()
        stats["Loss/signs/real"] = real_logits.detach().sign().mean()
        stats["real_logits"] = real_logits.detach()

        loss_Dreal: torch.Tensor | float = 0.0
        if do_Dmain:
            loss_Dreal = F.softplus(-real_logits)  # -log(sigmoid(logits))
            stats["Loss/D/loss"] = (loss_Dgen.detach() + loss_Dreal.detach()).mean()

        loss_Dr1: torch.Tensor | float = 0.0
        if do_Dr1:
            (r1_grads,) = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real_img_tmp], create_graph=True)
            r1_penalty = r1_grads.square().sum([1, 2, 3])
            loss_Dr1 = r1_penalty * (self.r1_gamma / 2)
            stats["Loss/r1_penalty"] = r1_penalty.detach().mean()
            stats["Loss/D/reg"] = loss_Dr1.detach().mean()

        self.backward((real_logits * 0 + loss_Dreal + loss_Dr1).mean().mul(gain))
