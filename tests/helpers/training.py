"""Training fixtures for unit tests: tiny G and D, a tiny ``model`` config, and a real Lightning trainer (one CPU
process, nothing written: no logger, checkpoint or bar)."""

from __future__ import annotations

from typing import Any

import torch

from fidmed.gan.networks import Discriminator, Generator


def cpu_trainer(max_steps: int, **kwargs: Any) -> Any:
    """``lightning.Trainer`` that runs ``max_steps`` steps on the CPU and writes nothing; ``kwargs`` add to it."""
    import lightning

    return lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


#: A ``model`` config node for StyleGAN2Module at 16 px (fast on a CPU).
TINY_MODEL = dict(
    name="tiny",
    z_dim=16,
    w_dim=16,
    mapping_layers=2,
    channel_base=128,
    channel_max=16,
    num_fp16_res=0,
    conv_clamp=None,
    mbstd_group=4,
    batch_size=8,
    batch_chunk=4,
    lr_g=0.002,
    lr_d=0.002,
    betas=[0.0, 0.99],
    eps=1e-8,
    ema_kimg=0.01,
    ema_rampup=None,
    style_mixing_prob=0.9,
    r1_gamma=1.0,
    pl_weight=2.0,
    pl_batch_shrink=2,
    pl_decay=0.01,
    g_reg_interval=4,
    d_reg_interval=16,
)


def tiny_networks(c_dim: int = 0) -> tuple[Generator, Discriminator]:
    """16 px G and D with float16 blocks (float32 on the CPU), conv_clamp and noise inputs that matter."""
    torch.manual_seed(0)
    G = Generator(
        z_dim=32,
        c_dim=c_dim,
        w_dim=32,
        img_resolution=16,
        img_channels=1,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(channel_base=512, channel_max=32, num_fp16_res=2, conv_clamp=256),
    )
    D = Discriminator(
        c_dim=c_dim,
        img_resolution=16,
        img_channels=1,
        channel_base=512,
        channel_max=32,
        num_fp16_res=2,
        conv_clamp=256,
        epilogue_kwargs=dict(mbstd_group_size=4),
    )
    with torch.no_grad():  # noise_strength starts at zero; make the noise inputs matter
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
    return G.train(), D.train()
