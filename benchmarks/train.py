"""Training speed: seconds per kimg of full StyleGAN2 training iterations, fidmed next to stylegan2-ada-pytorch.

    python benchmarks/train.py [--device cpu|cuda] [--models stylegan2_small stylegan2] [--resolution 256]
                               [--batch N [N ...]] [--chunk N [N ...]] [--augment noaug ada]
                               [--modes eager compiled] [--repeats R [R ...]] [--threads N] [--clock wall|cpu]
                               [--ada-p P]
                               [--reference PATH | --no-reference] [--out FILE.md]

What is timed: the phases of one training iteration as each training loop runs them, on the same weights, real
images and latents, with the same random seed before each phase:

- fidmed: :meth:`fidmed.gan.module.StyleGAN2Module.run_phase` (the code a training step runs; zero the optimiser,
  accumulate the gradients of every chunk, replace NaN/Inf gradients, Adam step) and the G EMA update, in the
  modes ``eager`` and ``compiled`` (``model.compile=true``: G main and D main through ``torch.compile``, the
  regularisation phases with the eager code, so when both modes are timed the eager Greg and Dreg times stand for
  both);
- the reference: stylegan2-ada-pytorch's own ``training/networks.py``, ``training/loss.py`` and
  ``training/augment.py``, driven as its ``training/training_loop.py`` drives them (phases Gmain, Greg, Dmain,
  Dreg with lazy intervals, Adam with ``lr * mb_ratio`` and ``betas ** mb_ratio``, ``gain = interval`` per
  chunk, ``nan_to_num`` of the gradients, the EMA update).

A whole iteration at the study's size (256 px, batch 32) takes minutes on a small CPU, so each phase is timed
separately, ``--repeats`` times after a warm-up iteration, the variants taking turns phase by phase (the order of
the variants rotates every round), and a kimg is composed from the phases' median times with the lazy intervals
of the model (4 and 16 for both models):

    s/kimg = (1000 / batch) * (t_Gmain + t_Dmain + t_Greg / g_reg_interval + t_Dreg / d_reg_interval + t_EMA)

On the CPU the reference's networks are built with ``num_fp16_res=0`` (its layers would otherwise run float16 on
the CPU, where fidmed runs float32, and the reference never trained on a CPU); on CUDA both use the model's
``num_fp16_res`` as in training. ``--batch`` (default: the model's ``batch_size``) and ``--chunk`` (default: the
model's ``batch_chunk``, at most the batch) set the minibatch and the images per forward/backward pass;
``--batch``, ``--chunk`` and ``--repeats`` take one value for every model or one per model of ``--models``.

The reference is not part of fidmed and is never committed: the benchmark copies it into the ignored folder
``benchmarks/.reference/stylegan2-ada-pytorch`` from ``--reference PATH`` (a checkout, or a bare git repository)
or, without ``--reference``, reuses that copy or clones https://github.com/NVlabs/stylegan2-ada-pytorch there.
The copy gets small patches to run on current PyTorch and Python (listed in the results): ``grid_sample_gradfix``
enabled on every torch version through ``torch.ops.aten.grid_sampler_2d_backward`` (the training loop enables
it; R1 through ADA's rotation needs it), no build of its custom CUDA ops (its reference implementations in plain
PyTorch run instead, on the CPU as on CUDA), ``InfiniteSampler.__init__`` without the argument ``Sampler`` no
longer takes, and ``dnnlib`` without ``distutils`` (removed in Python 3.12). ``conv2d_gradfix`` stays off: its
custom op needs cuDNN entry points that current PyTorch no longer has, and the training loop's setting only
matters on CUDA with torch 1.7 to 1.9.

Before timing, one warm-up iteration (every phase and the EMA; it compiles) checks that the variants compute the
same thing: each phase starts in every variant from the same weights and buffers, inputs and seed, and the gradients
it leaves are compared with the first variant's (fidmed averages the chunks' gradients where the reference sums
them, which Adam undoes up to ``eps``; the comparison scales them alike). Without augmentation the reference's and
fidmed's eager gradients are equal bit for bit on the CPU; compiled ones differ by float32 rounding.

``--clock cpu`` measures this process's CPU time instead of wall time: with ``--threads 1`` it is insensitive to
other jobs taking the cores (not meaningful on CUDA). The load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py

from machine import cpu_name  # noqa: E402

from fidmed.augment.ada import PIPELINES  # noqa: E402
from fidmed.config import compose_config  # noqa: E402
from fidmed.gan.module import StyleGAN2Module  # noqa: E402

REFERENCE_URL = "https://github.com/NVlabs/stylegan2-ada-pytorch"
REFERENCE_COPY = ROOT / "benchmarks" / ".reference" / "stylegan2-ada-pytorch"
PATCHED_MARK = ".fidmed-benchmark-patched"
#: the only folders of the reference the benchmark imports
REFERENCE_PARTS = ("dnnlib", "torch_utils", "training")
ADA_PIPELINE = "bgcfnc"  # the study's (train.py --augpipe default)

# (file, original text, patched text, why): each original must occur exactly once in the reference.
PATCHES: list[tuple[str, str, str, str]] = [
    (
        "torch_utils/ops/grid_sample_gradfix.py",
        "    if any(torch.__version__.startswith(x) for x in ['1.7.', '1.8.', '1.9']):\n        return True\n",
        "    return True  # fidmed benchmark: enabled on every torch version\n",
        "grid_sample_gradfix enabled on every torch version (it refuses anything but 1.7-1.9)",
    ),
    (
        "torch_utils/ops/grid_sample_gradfix.py",
        "        op = torch._C._jit_get_operation('aten::grid_sampler_2d_backward')\n"
        "        grad_input, grad_grid = op(grad_output, input, grid, 0, 0, False)\n",
        "        grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(\n"
        "            grad_output, input, grid, 0, 0, False, [True, True])  # fidmed benchmark: current signature\n",
        "grid_sampler_2d_backward called through torch.ops.aten with its current signature (output_mask)",
    ),
    (
        "torch_utils/ops/bias_act.py",
        "def _init():\n",
        "def _init():  # fidmed benchmark: no custom CUDA op build, the reference implementation runs\n"
        "    return False\n\ndef _unused_init():\n",
        "bias_act: no custom CUDA op build (its plain-PyTorch reference implementation runs)",
    ),
    (
        "torch_utils/ops/upfirdn2d.py",
        "def _init():\n",
        "def _init():  # fidmed benchmark: no custom CUDA op build, the reference implementation runs\n"
        "    return False\n\ndef _unused_init():\n",
        "upfirdn2d: no custom CUDA op build (its plain-PyTorch reference implementation runs)",
    ),
    (
        "torch_utils/misc.py",
        "        super().__init__(dataset)\n",
        "        super().__init__()  # fidmed benchmark: Sampler.__init__ takes no data source any more\n",
        "InfiniteSampler.__init__: Sampler.__init__ without the data source argument",
    ),
    (
        "dnnlib/util.py",
        "from distutils.util import strtobool\n",
        "def strtobool(val):  # fidmed benchmark: distutils is gone from Python 3.12\n"
        "    return {'y': 1, 'yes': 1, 't': 1, 'true': 1, 'on': 1, '1': 1}.get(str(val).lower(), 0)\n",
        "dnnlib: strtobool without distutils (removed in Python 3.12)",
    ),
    (
        "dnnlib/util.py",
        "import requests\n",
        "try:  # fidmed benchmark: only open_url needs it\n    import requests\nexcept ImportError:\n"
        "    requests = None\n",
        "dnnlib: requests optional (only its URL download uses it)",
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# The reference, in an ignored folder.
class BenchmarkError(RuntimeError):
    """A problem with the benchmark's inputs, stated with its fix."""


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _commit_of(path: Path) -> str:
    for args in (("--git-dir", str(path), "rev-parse", "HEAD"), ("-C", str(path), "rev-parse", "HEAD")):
        try:
            return _git(*args)
        except (subprocess.CalledProcessError, FileNotFoundError):
            continue
    return "unknown (not a git repository)"


def prepare_reference(source: str | None) -> tuple[Path, str]:
    """The patched copy of stylegan2-ada-pytorch in ``benchmarks/.reference`` and the commit it came from."""
    commit_file = REFERENCE_COPY / ".fidmed-benchmark-commit"
    if source is None and (REFERENCE_COPY / PATCHED_MARK).is_file():
        return REFERENCE_COPY, commit_file.read_text().strip()
    if REFERENCE_COPY.exists():
        shutil.rmtree(REFERENCE_COPY)
    REFERENCE_COPY.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        print(f"cloning {REFERENCE_URL} into {REFERENCE_COPY} ...", flush=True)
        try:
            _git("clone", "--quiet", "--depth", "1", REFERENCE_URL, str(REFERENCE_COPY))
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise BenchmarkError(
                f"cannot clone {REFERENCE_URL} ({detail.strip().splitlines()[-1] if detail.strip() else exc}); "
                "pass --reference PATH (a checkout or bare git repository of it) or --no-reference"
            ) from None
        commit = _commit_of(REFERENCE_COPY)
    else:
        src = Path(source).expanduser().resolve()
        if (src / "HEAD").is_file() and (src / "objects").is_dir():  # a bare repository
            REFERENCE_COPY.mkdir()
            archive = subprocess.run(
                ["git", "--git-dir", str(src), "archive", "HEAD", *REFERENCE_PARTS], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(REFERENCE_COPY)], input=archive, check=True)
        elif all((src / part).is_dir() for part in REFERENCE_PARTS):
            REFERENCE_COPY.mkdir()
            for part in REFERENCE_PARTS:
                shutil.copytree(src / part, REFERENCE_COPY / part)
        else:
            raise BenchmarkError(
                f"--reference {source}: not a stylegan2-ada-pytorch checkout (no {', '.join(REFERENCE_PARTS)} "
                "folders) nor a bare git repository of it; pass the folder of `git clone " + REFERENCE_URL + "`"
            )
        commit = _commit_of(src)
    for rel, old, new, _why in PATCHES:
        path = REFERENCE_COPY / rel
        text = path.read_text(encoding="utf-8-sig") if path.is_file() else ""
        if text.count(old) != 1:
            raise BenchmarkError(
                f"{rel} of the reference does not contain the text the benchmark patches ({_why}); the benchmark "
                "knows stylegan2-ada-pytorch's last commit d72cc7d: pass a checkout of it with --reference"
            )
        path.write_text(text.replace(old, new), encoding="utf-8")
    commit_file.write_text(commit + "\n")
    (REFERENCE_COPY / PATCHED_MARK).write_text("".join(f"- {why}\n" for *_, why in PATCHES))
    return REFERENCE_COPY, commit


def import_reference(path: Path) -> dict[str, Any]:
    sys.path.insert(0, str(path))
    from torch_utils import misc  # noqa: PLC0415  (the reference's packages, from its copy)
    from torch_utils.ops import grid_sample_gradfix
    from training import augment, loss, networks

    grid_sample_gradfix.enabled = True  # as its training loop sets it
    return {"misc": misc, "networks": networks, "loss": loss, "augment": augment}


# ---------------------------------------------------------------------------------------------------------------
# The variants: one training setup each, with the same phases.
@dataclass
class Setup:
    model: str
    cfg: Any  # the composed model config
    resolution: int
    channels: int
    batch: int
    chunk: int
    augment: str  # noaug | ada
    ada_p: float
    device: torch.device

    @property
    def fp16_res(self) -> int:
        return int(self.cfg.num_fp16_res) if self.device.type == "cuda" else 0


@dataclass
class Variant:
    name: str
    run_phase: Callable[[str, torch.Tensor, torch.Tensor], None]
    update_ema: Callable[[], None]
    networks: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]
    #: what a phase's gradients are multiplied by to compare them: fidmed averages its chunks' gradients, the
    #: reference sums them (Adam undoes the factor up to eps)
    grad_scale: float = 1.0
    first_call: dict[str, float] = field(default_factory=dict)  # seconds of each phase's first (compiling) call


def fidmed_variant(setup: Setup, compiled: bool) -> Variant:
    cfg = OmegaConf.to_container(setup.cfg, resolve=True)
    cfg["batch_size"], cfg["batch_chunk"], cfg["compile"] = setup.batch, setup.chunk, compiled
    augmentation = (
        {"name": "ada", "pipeline": ADA_PIPELINE, "p": setup.ada_p, "adaptive": False}
        if setup.augment == "ada"
        else None
    )
    torch.manual_seed(0)
    module = StyleGAN2Module(cfg, setup.resolution, setup.channels, augmentation, kimg=1000.0).to(setup.device)
    module.images_seen.fill_(100_000)  # past any EMA ramp-up
    optimizers = dict(zip(("G", "D"), module.configure_optimizers()))
    phases = {phase.name: phase for phase in module.phases}

    def run_phase(name: str, real: torch.Tensor, gen_z: torch.Tensor) -> None:
        phase = phases[name]
        module.run_phase(phase, optimizers[phase.module], real, gen_z)

    return Variant(
        "fidmed compiled" if compiled else "fidmed eager",
        run_phase,
        lambda: module._update_ema(setup.batch),
        lambda: (module.G, module.D),
        grad_scale=float(setup.batch // setup.chunk),
    )


def reference_variant(setup: Setup, ref: dict[str, Any], weights: tuple[dict, dict]) -> Variant:
    """stylegan2-ada-pytorch's networks, loss and augmentation, driven as its training loop drives them."""
    cfg, device = setup.cfg, setup.device
    common = dict(c_dim=0, img_resolution=setup.resolution, img_channels=setup.channels)
    G = ref["networks"].Generator(
        z_dim=int(cfg.z_dim),
        w_dim=int(cfg.w_dim),
        mapping_kwargs=dict(num_layers=int(cfg.mapping_layers)),
        synthesis_kwargs=dict(
            channel_base=int(cfg.channel_base),
            channel_max=int(cfg.channel_max),
            num_fp16_res=setup.fp16_res,
            conv_clamp=cfg.conv_clamp,
        ),
        **common,
    )
    D = ref["networks"].Discriminator(
        channel_base=int(cfg.channel_base),
        channel_max=int(cfg.channel_max),
        num_fp16_res=setup.fp16_res,
        conv_clamp=cfg.conv_clamp,
        epilogue_kwargs=dict(mbstd_group_size=int(cfg.mbstd_group)),
        **common,
    )
    G.load_state_dict(weights[0])
    D.load_state_dict(weights[1])
    G = G.train().requires_grad_(False).to(device)
    D = D.train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = None
    if setup.augment == "ada":
        augment_pipe = ref["augment"].AugmentPipe(**{name: 1 for name in PIPELINES[ADA_PIPELINE]})
        augment_pipe = augment_pipe.train().requires_grad_(False).to(device)
        augment_pipe.p.copy_(torch.as_tensor(setup.ada_p))
    loss = ref["loss"].StyleGAN2Loss(
        device=device,
        G_mapping=G.mapping,
        G_synthesis=G.synthesis,
        D=D,
        augment_pipe=augment_pipe,
        style_mixing_prob=float(cfg.style_mixing_prob),
        r1_gamma=float(cfg.r1_gamma),
        pl_batch_shrink=int(cfg.pl_batch_shrink),
        pl_decay=float(cfg.pl_decay),
        pl_weight=float(cfg.pl_weight),
    )
    phases: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, int]] = {}
    for name, module, lr, reg_interval in (
        ("G", G, cfg.lr_g, cfg.g_reg_interval),
        ("D", D, cfg.lr_d, cfg.d_reg_interval),
    ):
        mb_ratio = reg_interval / (reg_interval + 1)
        opt = torch.optim.Adam(
            module.parameters(), lr=float(lr) * mb_ratio, betas=[b**mb_ratio for b in cfg.betas], eps=float(cfg.eps)
        )
        phases[name + "main"] = (module, opt, 1)
        phases[name + "reg"] = (module, opt, int(reg_interval))
    misc = ref["misc"]
    rounds = setup.batch // setup.chunk

    def run_phase(name: str, real: torch.Tensor, gen_z: torch.Tensor) -> None:
        module, opt, interval = phases[name]
        opt.zero_grad(set_to_none=True)
        module.requires_grad_(True)
        c = torch.zeros([setup.batch, 0], device=device).split(setup.chunk)
        for round_idx, (real_img, real_c, z) in enumerate(zip(real.split(setup.chunk), c, gen_z.split(setup.chunk))):
            loss.accumulate_gradients(
                phase=name,
                real_img=real_img,
                real_c=real_c,
                gen_z=z,
                gen_c=real_c,
                sync=(round_idx == rounds - 1),
                gain=interval,
            )
        module.requires_grad_(False)
        for param in module.parameters():
            if param.grad is not None:
                misc.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        opt.step()

    @torch.no_grad()
    def update_ema() -> None:
        ema_nimg = float(cfg.ema_kimg) * 1000
        if cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, 100_000 * float(cfg.ema_rampup))
        ema_beta = 0.5 ** (setup.batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.copy_(p.lerp(p_ema, ema_beta))
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)

    return Variant("reference", run_phase, update_ema, lambda: (G, D))


# ---------------------------------------------------------------------------------------------------------------
# Timing.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PHASES = ("Gmain", "Greg", "Dmain", "Dreg", "EMA")  # the training loop's order
SUMMARY_RATIOS = (("fidmed eager", "reference"), ("fidmed compiled", "reference"), ("fidmed compiled", "fidmed eager"))
EAGER_IN_COMPILED = ("Greg", "Dreg")  # phases that model.compile=true runs eagerly (double backward)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_phase(variant: Variant, phase: str, real: torch.Tensor, gen_z: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)  # every variant draws the same style mixing, noise and augmentations
    if phase == "EMA":
        variant.update_ema()
    else:
        variant.run_phase(phase, real, gen_z)


def phase_network(variant: Variant, phase: str) -> tuple[torch.nn.Module]:
    G, D = variant.networks()
    return (G,) if phase.startswith("G") else (D,)


def max_difference(
    a: tuple[torch.nn.Module, ...], b: tuple[torch.nn.Module, ...], grad_scales: tuple[float, float] | None = None
) -> float:
    """Largest |a - b| over the parameters of the networks (with ``grad_scales``: over their gradients, each scaled
    by its factor), relative to the largest |a| of each tensor."""
    worst = 0.0
    for net_a, net_b in zip(a, b):
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            if grad_scales is None:
                va, vb = pa.detach().float(), pb.detach().float()
            elif pa.grad is None or pb.grad is None:
                continue
            else:
                va, vb = pa.grad.detach().float() * grad_scales[0], pb.grad.detach().float() * grad_scales[1]
            scale = float(va.abs().max()) or 1.0
            worst = max(worst, float((va - vb).abs().max()) / scale)
    return worst


def time_setup(
    setup: Setup, modes: list[str], ref: dict[str, Any] | None, repeats: int, clock: Callable[[], float]
) -> dict[str, Any]:
    """Per variant: per phase the timed samples (seconds), the first calls, and the warm-up comparison."""
    dev = setup.device
    gen = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, [setup.batch, setup.channels, setup.resolution, setup.resolution], generator=gen)
    real = (real.to(torch.float32) / 127.5 - 1).to(dev)
    z_dim = int(setup.cfg.z_dim)
    gen_z = {phase: torch.randn([setup.batch, z_dim], generator=gen).to(dev) for phase in PHASES}

    variants = [fidmed_variant(setup, compiled=(mode == "compiled")) for mode in modes]
    if ref is not None:
        G, D = variants[0].networks()
        weights = ({k: v.cpu() for k, v in G.state_dict().items()}, {k: v.cpu() for k, v in D.state_dict().items()})
        variants.append(reference_variant(setup, ref, weights))

    # Warm-up: one full iteration, the variants taking turns phase by phase; the first calls compile. Every phase
    # starts from the first variant's weights and buffers, with the same inputs and seed, and the gradients it
    # leaves are compared with the first variant's.
    base = variants[0]
    grad_diff: dict[str, dict[str, float]] = {v.name: {} for v in variants[1:]}
    for i, phase in enumerate(PHASES):
        # the base's weights before its phase's optimiser step (the state dict holds the live tensors: cloned)
        start = [{k: v.detach().clone() for k, v in net.state_dict().items()} for net in base.networks()]
        for variant in variants:
            if variant is not base:
                for mine, state in zip(variant.networks(), start):
                    mine.load_state_dict(state)  # copies in place: compiled twins see it too
            started = clock()
            call_phase(variant, phase, real, gen_z[phase], seed=100 + i)
            sync(dev)
            variant.first_call[phase] = clock() - started
            if variant is not base and phase != "EMA":
                grad_diff[variant.name][phase] = max_difference(
                    phase_network(base, phase), phase_network(variant, phase), (base.grad_scale, variant.grad_scale)
                )

    samples: dict[str, dict[str, list[float]]] = {v.name: {p: [] for p in PHASES} for v in variants}
    # The compiled mode runs Greg and Dreg with the eager code (double backward); with the eager mode present, its
    # times stand for both instead of timing the same code twice.
    both = "fidmed eager" in samples and "fidmed compiled" in samples
    shared = {("fidmed compiled", p): "fidmed eager" for p in EAGER_IN_COMPILED} if both else {}
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for i, phase in enumerate(PHASES):
            for variant in order:
                if (variant.name, phase) in shared:
                    continue
                start = clock()
                call_phase(variant, phase, real, gen_z[phase], seed=1000 * (r + 1) + i)
                sync(dev)
                samples[variant.name][phase].append(clock() - start)
        print(f"  round {r + 1}/{repeats} done ({time.strftime('%H:%M:%S')})", flush=True)
    for (name, phase), source in shared.items():
        samples[name][phase] = samples[source][phase]
    return {
        "samples": samples,
        "first_call": {v.name: v.first_call for v in variants},
        "grad_diff": grad_diff,
        "base": base.name,
    }


def seconds_per_kimg(setup: Setup, times: dict[str, float]) -> float:
    cfg = setup.cfg
    per_iteration = (
        times["Gmain"]
        + times["Dmain"]
        + times["Greg"] / int(cfg.g_reg_interval)
        + times["Dreg"] / int(cfg.d_reg_interval)
        + times["EMA"]
    )
    return 1000 / setup.batch * per_iteration


# ---------------------------------------------------------------------------------------------------------------
# Report.
def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_lines(device: torch.device, clock: str) -> list[str]:
    lines = [
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- clock: {'wall time' if clock == 'wall' else 'CPU time of this process'}",
    ]
    if device.type == "cpu":
        try:
            import torch._inductor.cpp_builder as cpp_builder

            compiler = cpp_builder.get_cpp_compiler()
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()
            lines.append(f"- C++ compiler (inductor): {version[0] if version else compiler}")
        except Exception as exc:  # noqa: BLE001 -- a private API; only informative
            lines.append(f"- C++ compiler (inductor): not found ({type(exc).__name__})")
    return lines


def setup_report(setup: Setup, result: dict[str, Any], summary: list[str], cpu_clock: bool = False) -> list[str]:
    """The section of one setup; appends its row to ``summary``. ``cpu_clock``: the times are CPU times."""
    cfg = setup.cfg
    samples = result["samples"]
    names = list(samples)
    med = {n: {p: statistics.median(samples[n][p]) for p in PHASES} for n in names}
    fastest = {n: {p: min(samples[n][p]) for p in PHASES} for n in names}
    kimg = {n: seconds_per_kimg(setup, med[n]) for n in names}
    per_iter = {"Gmain": "1", "Dmain": "1", "Greg": f"1/{cfg.g_reg_interval}", "Dreg": f"1/{cfg.d_reg_interval}"}
    per_iter["EMA"] = "1"
    lines = [
        f"### {setup.model}, {setup.resolution} px, batch {setup.batch} in chunks of {setup.chunk}, "
        + ("no augmentation" if setup.augment == "noaug" else f"ADA {ADA_PIPELINE} p={setup.ada_p:g}"),
        "",
        f"z = w = {cfg.z_dim}, {cfg.mapping_layers} mapping layers, channel_base {cfg.channel_base}, channel_max "
        f"{cfg.channel_max}, num_fp16_res {setup.fp16_res}{' (on the CPU: float32)' if setup.device.type == 'cpu' else ''}, "
        f"conv_clamp {cfg.conv_clamp}, mbstd group {cfg.mbstd_group}, r1_gamma {cfg.r1_gamma}, pl_weight "
        f"{cfg.pl_weight}; {len(samples[names[0]]['Gmain'])} timed rounds. Seconds per phase call: median "
        "(fastest).",
        "",
        "| phase | calls per iteration | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for p in PHASES:
        cells = " | ".join(f"{med[n][p]:.3f} ({fastest[n][p]:.3f})" for n in names)
        lines.append(f"| {p} | {per_iter[p]} | {cells} |")
    lines.append("| **s/kimg** (medians) | | " + " | ".join(f"**{kimg[n]:.1f}**" for n in names) + " |")
    lines.append("| images/s | | " + " | ".join(f"{1000 / kimg[n]:.2f}" for n in names) + " |")
    lines.append("")
    if "reference" in names:
        for n in names:
            if n != "reference":
                lines.append(
                    f"- speed {n} / reference: **{kimg['reference'] / kimg[n]:.2f}** (reference s/kimg / {n} s/kimg; "
                    "> 1: fidmed faster); per phase: "
                    + ", ".join(f"{p} {med['reference'][p] / med[n][p]:.2f}" for p in PHASES)
                )
    if "fidmed eager" in names and "fidmed compiled" in names:
        lines.append(
            f"- speed compiled / eager: **{kimg['fidmed eager'] / kimg['fidmed compiled']:.2f}**; per phase: "
            + ", ".join(f"{p} {med['fidmed eager'][p] / med['fidmed compiled'][p]:.2f}" for p in PHASES)
        )
    warm = [n for n in names if n != "fidmed compiled"]  # its first calls compile
    if warm:
        lines.append(
            "- the warm-up iteration (first calls, one sample each; a check on the medians) composes to: "
            + ", ".join(f"{n} {seconds_per_kimg(setup, result['first_call'][n]):.1f} s/kimg" for n in warm)
        )
    if "fidmed compiled" in names:
        first = result["first_call"]["fidmed compiled"]
        lines.append(
            "- first call of each phase compiled (compilation included"
            + ("; CPU time of this process: the C++ compiler's processes are not counted" if cpu_clock else "")
            + ", s): "
            + ", ".join(f"{p} {first[p]:.1f}" for p in PHASES)
        )
    for name, diffs in result["grad_diff"].items():
        described = ", ".join(f"{p} {'0' if d == 0 else f'{d:.1e}'}" for p, d in diffs.items())
        lines.append(
            f"- warm-up iteration, each phase from the same weights, inputs and seed: largest difference of the "
            f"gradients of {name} and {result['base']}, relative to each tensor's largest |gradient|: {described}"
            + (" (equal bit for bit)" if not any(diffs.values()) else "")
        )
    lines.append("")
    augmentation = "none" if setup.augment == "noaug" else f"ADA {ADA_PIPELINE} p={setup.ada_p:g}"
    cells = [f"{kimg[n]:.1f}" for n in names]
    cells += [f"{kimg[b] / kimg[a]:.2f}" for a, b in SUMMARY_RATIOS if a in kimg and b in kimg]
    summary.append(
        f"| {setup.model} | {setup.resolution} | {setup.batch} / {setup.chunk} | {augmentation} | "
        + " | ".join(cells)
        + " |"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--models", nargs="+", default=["stylegan2_small", "stylegan2"], help="model configs")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--channels", type=int, default=1, help="image channels (1: the study's grey images)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="minibatch (default: the model's)")
    parser.add_argument("--chunk", type=int, nargs="+", default=None, help="images per pass (default: the model's)")
    parser.add_argument("--augment", nargs="+", default=["noaug", "ada"], choices=["noaug", "ada"])
    parser.add_argument("--ada-p", type=float, default=0.5, help="ADA's (fixed) augmentation probability")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3], help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reference", default=None, help="a stylegan2-ada-pytorch checkout or bare git repository")
    group.add_argument("--no-reference", action="store_true", help="time fidmed only")
    parser.add_argument("--out", default=None, help="write the Markdown report here (default: print only)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu does not measure GPU work; use --clock wall with --device cuda")
    clock = CLOCKS[args.clock]
    started, load_start = time.time(), load_average()
    ref, ref_lines = None, ["- reference: not timed (--no-reference)"]
    if not args.no_reference:
        try:
            path, commit = prepare_reference(args.reference)
        except BenchmarkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        ref = import_reference(path)
        ref_lines = [
            f"- reference: stylegan2-ada-pytorch commit {commit} ({REFERENCE_URL}), copied to "
            f"benchmarks/.reference/ and patched to run on torch {torch.__version__}:",
            *(f"  - {why}" for *_, why in PATCHES),
        ]

    sections: list[str] = []
    variants = [f"fidmed {mode}" for mode in args.modes] + ([] if ref is None else ["reference"])
    ratios = [(a, b) for a, b in SUMMARY_RATIOS if a in variants and b in variants]
    summary = [
        "| model | px | batch / chunk | augmentation | "
        + " | ".join(f"{v} s/kimg" for v in variants)
        + "".join(f" | speed {a.removeprefix('fidmed ')} / {b.removeprefix('fidmed ')}" for a, b in ratios)
        + " |",
        "|---|---:|---:|---|" + "---:|" * (len(variants) + len(ratios)),
    ]

    def per_model(option: str, values: list[int] | None, index: int) -> int | None:
        if values is None:
            return None
        if len(values) not in (1, len(args.models)):
            parser.error(f"{option} takes one value or one per model ({len(args.models)}), got {len(values)}")
        return values[index if len(values) > 1 else 0]

    for m, model in enumerate(args.models):
        cfg = compose_config([f"model={model}"]).model
        batch = per_model("--batch", args.batch, m) or int(cfg.batch_size)
        chunk = min(per_model("--chunk", args.chunk, m) or int(cfg.batch_chunk or batch), batch)
        if batch % chunk:
            parser.error(f"--batch {batch} is not a multiple of the chunk {chunk}; pass --chunk")
        for augment in args.augment:
            setup = Setup(model, cfg, args.resolution, args.channels, batch, chunk, augment, args.ada_p, device)
            print(f"{model} {args.resolution} px batch {batch}/{chunk} {augment} ...", flush=True)
            result = time_setup(setup, args.modes, ref, per_model("--repeats", args.repeats, m), clock)
            section = setup_report(setup, result, summary, cpu_clock=args.clock == "cpu")
            print("\n".join(section), flush=True)
            sections += section

    command = "python benchmarks/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Training speed",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s in all)",
        "",
        *machine_lines(device, args.clock),
        f"- load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_average()}",
        *ref_lines,
        "",
        "Each phase (zero the optimiser, forward and backward of every chunk, NaN/Inf gradients replaced, Adam step) "
        "and the G EMA update is timed separately, the variants taking turns phase by phase; a kimg is composed from "
        "the medians with the lazy regularisation intervals:",
        "",
        "    s/kimg = (1000 / batch) * (t_Gmain + t_Dmain + t_Greg / g_reg_interval + t_Dreg / d_reg_interval + t_EMA)",
        "",
        "Speed ratios are quotients of s/kimg (> 1: the first is faster).",
        "",
        *summary,
        "",
        "`fidmed compiled` is `model.compile=true`: G main and D main through torch.compile (inductor), Greg and Dreg "
        "with the eager code (AOTAutograd cannot differentiate twice): when `fidmed eager` is timed too, its Greg and "
        "Dreg times stand for both instead of timing the same code twice.",
        "",
        *sections,
    ]
    text = "\n".join(lines)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written {out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
