"""Check: how far ``model.compile=true`` moves G main's gradients from eager, next to what a thread-count change does.

    python benchmarks/compile_grads.py [--resolution 64] [--batch 8]

Builds a 5-block generator (``--resolution`` px, 64 channels at most, float32) and D with fixed weights, runs G
main once eagerly with one thread, once eagerly with two threads (same code, another split of the parallel sums)
and once through the compiled twins (``fidmed.gan.loss.compile_networks``, inductor; one thread), each from the
same weights, inputs and seed, and prints per gradient tensor max |difference| / max |eager gradient|: the
largest ten for the compiled run, and the largest and the median over tensors for both comparisons. Compiling
takes a few minutes on a small CPU. benchmarks/results/train.md quotes its output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidmed.gan.loss import StyleGAN2Loss  # noqa: E402
from fidmed.gan.networks import Discriminator, Generator  # noqa: E402


def networks(resolution: int) -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    G = Generator(
        z_dim=64,
        c_dim=0,
        w_dim=64,
        img_resolution=resolution,
        img_channels=1,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(channel_base=2048, channel_max=64, num_fp16_res=0, conv_clamp=256),
    )
    D = Discriminator(
        c_dim=0,
        img_resolution=resolution,
        img_channels=1,
        channel_base=2048,
        channel_max=64,
        num_fp16_res=0,
        conv_clamp=256,
        epilogue_kwargs=dict(mbstd_group_size=4),
    )
    with torch.no_grad():  # noise_strength starts at zero; make the noise inputs matter
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
    return G.train(), D.train()


def gmain_gradients(resolution: int, batch: int, threads: int, compiled: bool) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    G, D = networks(resolution)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(batch, 1, resolution, resolution, generator=g) * 2 - 1
    z = torch.randn(batch, 64, generator=g)
    c = torch.zeros(batch, 0)
    loss = StyleGAN2Loss(G, D, compile=compiled)
    G.requires_grad_(True)
    D.requires_grad_(False)
    torch.manual_seed(5)
    t = time.perf_counter()
    loss.accumulate_gradients(phase="Gmain", real_img=real, real_c=c, gen_z=z, gen_c=c, gain=1.0)
    print(f"G main, {threads} thread(s), {'compiled' if compiled else 'eager'}: {time.perf_counter() - t:.1f} s")
    return {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}


def deviations(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((other[n] - a).abs().max() / a.abs().max().clamp_min(1e-30)) for n, a in ref.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    eager = gmain_gradients(args.resolution, args.batch, 1, False)
    two = deviations(eager, gmain_gradients(args.resolution, args.batch, 2, False))
    comp = deviations(eager, gmain_gradients(args.resolution, args.batch, 1, True))
    print(f"\ntorch {torch.__version__}, {args.resolution} px, batch {args.batch}, {len(eager)} gradient tensors")
    print("compiled vs eager, largest ten (max |difference| / max |eager gradient|):")
    for name in sorted(comp, key=comp.get, reverse=True)[:10]:
        print(f"  {comp[name]:.2e}  {name} {tuple(eager[name].shape)}")
    for label, dev in (("compiled vs eager", comp), ("eager, 2 threads vs 1", two)):
        print(f"{label}: largest {max(dev.values()):.2e}, median {statistics.median(dev.values()):.2e}")


if __name__ == "__main__":
    main()
