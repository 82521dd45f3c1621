"""Every config group option composes, overrides reach the job, and run.py prints the config."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO

GROUPS = ["modality", "model", "augmentation", "extractor", "trainer", "logger", "eval", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(compose_cfg, group):
    opts = options(group)
    assert opts, f"config group {group} has no options"
    for opt in opts:
        cfg = compose_cfg([f"{group}={opt}"])
        OmegaConf.to_container(cfg, resolve=False)  # no broken interpolation syntax
        if group == "extractor":
            assert list(cfg.extractor.keys()) == [opt]
            assert cfg.extractor[opt].name == opt
        elif group not in ("experiment",):
            assert cfg[group] is not None


def test_default_is_phantom_small_gan_inception_tf(compose_cfg):
    cfg = compose_cfg()
    assert cfg.modality.name == "phantom"
    assert cfg.model.name == "stylegan2_small"
    assert cfg.augmentation.name == "noaug"
    assert list(cfg.extractor.keys()) == ["inception_tf"]
    assert cfg.eval.weights == "pretrained"  # plain run.py never substitutes weights


def test_study_model_settings(compose_cfg):
    m = compose_cfg(["model=stylegan2"]).model
    assert (m.z_dim, m.w_dim, m.mapping_layers, m.channel_base, m.channel_max) == (512, 512, 8, 32768, 512)
    assert (m.batch_size, m.lr_g, m.lr_d, list(m.betas), m.eps) == (32, 0.002, 0.002, [0.0, 0.99], 1e-8)
    assert (m.ema_kimg, m.ema_rampup, m.style_mixing_prob, m.r1_gamma) == (10.0, None, 0.9, 8.2)
    assert (m.pl_weight, m.pl_batch_shrink, m.pl_decay, m.g_reg_interval, m.d_reg_interval) == (2.0, 2, 0.01, 4, 16)
    assert (m.num_fp16_res, m.conv_clamp, m.mbstd_group) == (4, 256, 4)


def test_overrides_reach_every_group(compose_cfg):
    cfg = compose_cfg(["model.r1_gamma=3.5", "schedule.kimg=2", "eval.num_gen=7", "logger=csv",
                       "modality.resolution=64", "experiment=smoke", "seed=5"])
    assert cfg.model.r1_gamma == 3.5
    assert cfg.eval.num_gen == 7  # command-line values win over the experiment recipe's
    assert cfg.modality.resolution == 64
    assert cfg.schedule.kimg == 2
    assert cfg.logger.name == "csv"  # and so do command-line group choices
    assert cfg.seed == 5


def test_multi_extractor_selection(compose_cfg):
    names = options("extractor")
    cfg = compose_cfg([f"extractor=[{','.join(names)}]"])
    assert list(cfg.extractor.keys()) == names


def test_run_py_prints_config_and_rejects_unknown_keys(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "--cfg", "job", "schedule.kimg=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.schedule.kimg == 3 and printed.modality.name == "phantom"
    bad = subprocess.run([sys.executable, "run.py", "trainer.kmig=3"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0
    assert "kmig" in bad.stderr and "Traceback" not in bad.stderr
