"""Time each augmentation setting per batch, alone and inside one small-StyleGAN2 training step.

    python benchmarks/augment.py [--batch 32] [--res 64] [--channels 1] [--repeats 7] [--step-repeats 3]
                                 [--device cpu] [--threads N] [--clock wall|cpu]
                                 [--out benchmarks/results/augment.md]

The recorded results (benchmarks/results/augment.md) were taken on a shared 2-core machine with
``--threads 1 --clock cpu``, which makes them insensitive to other jobs taking the core.

Part 1 times the augmentation alone on a ``batch x channels x res x res`` batch: forward, and forward +
backward to the input (what a G or D step pays). APA's own cost excludes generating the fakes (its
``make_fake`` returns random images here); its real cost, generating ``p * batch`` images with G, shows in
part 2.

Part 2 (when ``fidmed.gan`` is importable) times one training iteration without lazy regularisation, i.e. the
phases Gmain + Dmain of :class:`fidmed.gan.loss.StyleGAN2Loss`, of the ``stylegan2_small`` model
(conf/model/stylegan2_small.yaml) with each augmentation, and a D R1 phase (Dreg, the double backward through
the augmentation) separately. Times are wall-clock or, with ``--clock cpu``, this process's CPU time. Each
cell gives the fastest and the median of the timed runs after two warm-up runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py

from machine import cpu_name  # noqa: E402

from fidmed.augment import Augmentation  # noqa: E402
from fidmed.augment.ada import ADA  # noqa: E402
from fidmed.augment.apa import APA  # noqa: E402
from fidmed.augment.diffaugment import DiffAugment  # noqa: E402


def settings() -> dict[str, Augmentation]:
    return {
        "noaug": Augmentation(),
        "ada bgcfnc p=0.5": ADA(pipeline="bgcfnc", p=0.5, adaptive=False),
        "apa p=0.5": APA(p=0.5, adaptive=False),
        "diffaugment color,translation,cutout": DiffAugment("color,translation,cutout"),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"now": time.perf_counter}  # set once in main() from --clock


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> tuple[float, float]:
    """(fastest, median) time of ``fn`` in milliseconds on the selected clock, after ``warmup`` calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = CLOCK["now"]()
        fn()
        sync()
        times.append((CLOCK["now"]() - start) * 1000)
    return min(times), statistics.median(times)


def machine_info(device: torch.device) -> list[str]:
    cpu = cpu_name()
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    if hasattr(os, "getloadavg"):
        lines.append(
            "- load average at start (1, 5, 15 min): "
            + ", ".join(f"{v:.2f}" for v in os.getloadavg())
            + " (other jobs share the machine when this exceeds the core count)"
        )
    return lines


def augmentation_alone(
    batch: int, channels: int, res: int, repeats: int, device: torch.device, fastest: dict[str, tuple[float, float]]
) -> list[str]:
    """Table rows; ``fastest`` receives each setting's fastest (forward, forward + backward) times (ms)."""
    rows = ["| setting | forward (ms) | forward + backward (ms) |", "|---|---:|---:|"]  # fastest / median
    for name, aug in settings().items():
        aug = aug.to(device)
        x = torch.rand(batch, channels, res, res, device=device) * 2 - 1
        fake = lambda n: torch.rand(n, channels, res, res, device=device) * 2 - 1  # noqa: E731

        def forward() -> torch.Tensor:
            return aug(aug.replace_reals(x, fake))

        def forward_backward() -> None:
            xi = x.detach().requires_grad_(True)
            y = aug(aug.replace_reals(xi, fake))
            y.backward(torch.ones_like(y))

        with torch.no_grad():
            t_fwd = timed(forward, repeats, device)
        t_both = timed(forward_backward, repeats, device)
        fastest[name] = (t_fwd[0], t_both[0])
        rows.append(f"| {name} | {t_fwd[0]:.2f} / {t_fwd[1]:.2f} | {t_both[0]:.2f} / {t_both[1]:.2f} |")
    return rows


def training_step(
    batch: int, channels: int, res: int, repeats: int, device: torch.device, alone: dict[str, tuple[float, float]]
) -> list[str]:
    try:
        from omegaconf import OmegaConf

        from fidmed.gan.loss import StyleGAN2Loss
        from fidmed.gan.networks import build_networks
    except Exception as err:  # the GAN package is written in parallel; report instead of failing
        return [f"fidmed.gan is not importable ({type(err).__name__}: {err}); no training-step comparison."]
    root = Path(__file__).resolve().parents[1]
    small = OmegaConf.load(root / "conf" / "model" / "stylegan2_small.yaml")
    base = OmegaConf.load(root / "conf" / "model" / "stylegan2.yaml")
    cfg = OmegaConf.merge(base, {k: v for k, v in small.items() if k != "defaults"})
    torch.manual_seed(0)
    G, D = build_networks(
        resolution=res,
        channels=channels,
        z_dim=int(cfg.z_dim),
        w_dim=int(cfg.w_dim),
        mapping_layers=int(cfg.mapping_layers),
        channel_base=int(cfg.channel_base),
        channel_max=int(cfg.channel_max),
        num_fp16_res=int(cfg.num_fp16_res),
        conv_clamp=None if cfg.conv_clamp is None else float(cfg.conv_clamp),
        mbstd_group=int(cfg.mbstd_group),
    )
    G, D = G.to(device), D.to(device)
    real = torch.rand(batch, channels, res, res, device=device) * 2 - 1
    z = torch.randn(batch, G.z_dim, device=device)

    @torch.no_grad()
    def make_fake(n: int) -> torch.Tensor:
        return G(torch.randn(n, G.z_dim, device=device), None)

    rows = [
        f"Model: conf/model/stylegan2_small.yaml (z=w={cfg.z_dim}, channel_base {cfg.channel_base}, "
        f"channel_max {cfg.channel_max}, mbstd group {cfg.mbstd_group}), {res}x{res}x{channels}, batch {batch} "
        "in one chunk, r1_gamma 8.2.",
        "",
        "Fastest / median of the timed runs (settings take turns in each round; two warm-up rounds); "
        "the ratio uses the fastest.",
        "",
        "| setting | Gmain + Dmain (ms) | x noaug | Dreg / R1 (ms) | x noaug |",
        "|---|---:|---:|---:|---:|",
    ]

    def phase_fn(aug: Augmentation, loss: StyleGAN2Loss, name_: str, module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.requires_grad_(True)
            img = aug.replace_reals(real, make_fake) if module is D else real
            loss.accumulate_gradients(phase=name_, real_img=img, real_c=None, gen_z=z, gen_c=None, gain=1.0)
            module.requires_grad_(False)
            module.zero_grad(set_to_none=True)

        return run

    # Settings take turns within each repeat, so that slow drifts of the machine affect all of them alike.
    jobs: dict[str, dict[str, Callable[[], None]]] = {}
    for name, aug in settings().items():
        aug = aug.to(device)
        loss = StyleGAN2Loss(G, D, augment_pipe=aug, r1_gamma=8.2).to(device)
        g_main, d_main = phase_fn(aug, loss, "Gmain", G), phase_fn(aug, loss, "Dmain", D)
        jobs[name] = {"step": lambda g=g_main, d=d_main: (g(), d()), "r1": phase_fn(aug, loss, "Dreg", D)}
    samples = {name: {kind: [] for kind in job} for name, job in jobs.items()}
    for round_ in range(repeats + 2):  # the first two rounds warm up
        for name, job in jobs.items():
            for kind, fn in job.items():
                t = timed(fn, 1, device, warmup=0)[0]
                if round_ >= 2:
                    samples[name][kind].append(t)
    base = {kind: min(samples["noaug"][kind]) for kind in ("step", "r1")}
    notes = []
    for name in jobs:
        t_step, t_r1 = samples[name]["step"], samples[name]["r1"]
        rows.append(
            f"| {name} | {min(t_step):.0f} / {statistics.median(t_step):.0f} "
            f"| {min(t_step) / base['step']:.2f} "
            f"| {min(t_r1):.0f} / {statistics.median(t_r1):.0f} | {min(t_r1) / base['r1']:.2f} |"
        )
        extra = min(t_step) - base["step"]
        if name.startswith("apa"):
            notes.append(
                f"- {name}: {extra:+.0f} ms per Gmain + Dmain: Dmain generates the fakes that replace "
                f"about p x batch of its reals (the swap itself: {alone[name][1]:.1f} ms in part 1)."
            )
        elif name != "noaug":
            fwd, both = alone[name]
            notes.append(
                f"- {name}: {extra:+.0f} ms per Gmain + Dmain, which augments the fakes in Gmain and "
                f"Dmain (forward + backward) and the reals in Dmain (forward only): part 1 predicts "
                f"2 x {both:.1f} + {fwd:.1f} = {2 * both + fwd:.0f} ms."
            )
    return rows + [
        "",
        "Overhead against noaug (fastest runs; differences of a few percent are run-to-run noise):",
        "",
        *notes,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the augmentation alone")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed runs of each training step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: immune to other jobs "
        "taking the core; not meaningful for --device cuda)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = torch's default); 1 is steadier on a shared machine",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "augment.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    CLOCK["now"] = CLOCKS[args.clock]
    torch.manual_seed(0)
    alone: dict[str, tuple[float, float]] = {}
    shape = f"{args.batch} x {args.channels} x {args.res} x {args.res}"
    lines = [
        "# Augmentation cost",
        "",
        f"Command: `python benchmarks/augment.py --batch {args.batch} --channels {args.channels} "
        f"--res {args.res} --repeats {args.repeats} --step-repeats {args.step_repeats} --device {args.device} "
        f"--threads {args.threads} --clock {args.clock}`"
        f" ({time.strftime('%Y-%m-%d')})",
        "",
        *machine_info(device),
        "",
        f"## Augmentation alone, batch {shape}",
        "",
        "Fastest / median of the timed runs; backward = gradient of sum(output) to the input. "
        "APA excludes generating the fakes (random images stand in).",
        "",
        *augmentation_alone(args.batch, args.channels, args.res, args.repeats, device, alone),
        "",
        "## Inside one training iteration",
        "",
        *training_step(args.batch, args.channels, args.res, args.step_repeats, device, alone),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
