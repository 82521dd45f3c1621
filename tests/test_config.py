"""Every config group option composes, overrides reach the job, typed schemas refuse wrong values and unknown keys
when the config is composed, and run.py prints the config."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO

GROUPS = ["modality", "model", "augmentation", "extractor", "trainer", "schedule", "logger", "eval", "experiment"]


def options(group: str) -> list[str]:
    """A group's options as Hydra lists them: YAML files under conf/ and the schema/registry nodes."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fidmed.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


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
    cfg = compose_cfg(
        [
            "model.r1_gamma=3.5",
            "schedule.kimg=2",
            "eval.num_gen=7",
            "logger=csv",
            "modality.resolution=64",
            "experiment=smoke",
            "seed=5",
        ]
    )
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
    out = subprocess.run(
        [sys.executable, "run.py", "--cfg", "job", "schedule.kimg=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.schedule.kimg == 3 and printed.modality.name == "phantom"
    bad = subprocess.run(
        [sys.executable, "run.py", "trainer.kmig=3"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0
    assert "kmig" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.kimg=abc", "schedule.kimg"),
        ("eval.num_gen=abc", "could not be converted to Int"),
        ("+trainer.kimgg=1", "Key 'kimgg' not in 'Trainer'"),
        ("+eval.prdc.kk=3", "Key 'kk' not in 'PRDCConfig'"),
        ("eval.precision=fp16", "fp16"),
        ("stage=bogus", "bogus"),
        ("trainer.kimg=3", "trainer.kimg is now schedule.kimg"),
        ("eval.knn_k=3", "eval.knn_k is now eval.prdc.k"),
        ("extractor=[nope]", "unknown extractor 'nope'; available: clip"),
        ("augmentation=foo", "unknown augmentation 'foo'; available: ada, apa, diffaugment, noaug"),
    ],
)
def test_typed_schemas_refuse_wrong_values_and_unknown_keys_when_composed(override, message):
    from fidmed.config import compose_config
    from fidmed.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        compose_config([override])
    assert "\n" not in str(info.value)  # one line


def test_values_are_typed_and_defaults_live_in_the_schemas():
    """The composed values have their schema types (no casts needed), and no YAML repeats a schema default."""
    import dataclasses

    import yaml

    from fidmed import config as C
    from fidmed.config import compose_config

    cfg = compose_config(["schedule.kimg=2.5", "eval.num_gen=7", "schedule.eval_kimg=3"])
    assert cfg.schedule.kimg == 2.5 and isinstance(cfg.eval.num_gen, int) and isinstance(cfg.schedule.eval_kimg, float)
    assert cfg.stage == C.Stage.all and cfg.eval.weights == C.WeightsMode.pretrained
    assert OmegaConf.get_type(cfg.model) is C.StyleGAN2 and OmegaConf.get_type(cfg.trainer) is C.Trainer
    schemas = {"model": C.StyleGAN2, "trainer": C.Trainer, "schedule": C.Schedule, "modality": C.FolderModality}
    for group, schema in schemas.items():
        defaults = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
        for path in (CONF_DIR / group).glob("*.yaml"):
            values = yaml.safe_load(path.read_text()) or {}
            repeated = {
                k
                for k, v in values.items()
                if k in defaults and k != "name" and v == defaults[k] and not isinstance(v, str) or (k == "kind")
            }
            assert not repeated, f"{path.name} repeats the schema defaults of {sorted(repeated)}"


def test_trainer_holds_only_lightning_arguments_and_hardware_never_changes_the_schedule():
    import inspect

    import lightning

    from fidmed.config import compose_config

    accepted = set(inspect.signature(lightning.pytorch.Trainer).parameters)
    for trainer in ("cpu", "gpu", "ddp"):
        cfg = compose_config([f"trainer={trainer}"])
        assert set(cfg.trainer) - {"_target_"} <= accepted, trainer
        assert cfg.schedule == compose_config([]).schedule  # the device choice never changes the experiment
    study = compose_config(["modality=mri", "schedule=study"])
    assert study.schedule.kimg == 5000 == study.modality.study_kimg


def test_fidmed_evaluate_composes_the_eval_defaults_of_run_py(tmp_path):
    """`fidmed evaluate` has no defaults of its own: its eval node is run.py's, plus its options."""
    import argparse

    from fidmed.config import compose_config
    from fidmed.evaluation.cli import add_evaluate_parser, eval_config

    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["evaluate", "g", "r"])
    assert eval_config(args).eval == compose_config([]).eval
    args = p.parse_args(["evaluate", "g", "r", "--batch-size", "8", "--set", "prdc.k=3", "--metrics", "fd", "prdc"])
    ev = eval_config(args).eval
    assert (ev.batch_size, ev.prdc.k, list(ev.metrics)) == (8, 3, ["fd", "prdc"])
