"""Sweep specs -> Hydra overrides (grid/random), validation before any job, the paper's 16 x 11 grid, sweep.py."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONF_DIR, REPO
from fidmed.errors import ConfigError
from fidmed.sweeps import (check_launcher_available, expand_grid, expand_local, multirun_overrides, parse_spec,
                           sample_random, to_overrides, validate_against_config)

# REFERENCE.md section 4 / section 1: 7 ImageNet + 4 RadImageNet extractors ("Incept" = inception_tf).
STUDY_EXTRACTORS = {"inception_tf", "resnet", "swav", "dino", "swin", "irv2", "densenet", "radimagenet_inception",
                    "radimagenet_resnet", "radimagenet_irv2", "radimagenet_densenet"}


def _parse_override_value(line: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (ov,) = OverridesParser.create().parse_overrides([line])
    assert not ov.is_sweep_override(), line
    return ov.key_or_group, ov.value()


@pytest.mark.parametrize("value", ["ada", "color,translation", "it's", "a=b", "1.0", "null", "x y", 3, 0.5, 1e-05,
                                   True, None, [1, 2], ["color", "translation"], {"cutout": 0, "rotate": 0.5}])
def test_override_translation_round_trips_through_hydras_parser(value):
    (line,) = to_overrides({"augmentation.policy": value})
    key, parsed = _parse_override_value(line)
    assert key == "augmentation.policy"
    assert parsed == value and type(parsed) is type(value)


def test_grid_expands_to_the_cartesian_product_in_order():
    spec = parse_spec({"method": "grid", "parameters": {
        "experiment": {"value": "smoke"}, "seed": {"values": [0, 1]}, "augmentation": {"values": ["noaug", "ada", "apa"]}}})
    trials = expand_grid(spec)
    expected = [{"experiment": "smoke", "seed": s, "augmentation": a} for s, a in itertools.product([0, 1],
                                                                                                 ["noaug", "ada", "apa"])]
    assert trials == expected
    assert to_overrides(trials[4]) == ["experiment=smoke", "seed=1", "augmentation=ada"]
    assert expand_local(spec, count=2) == expected[:2]


def test_random_draws_respect_distributions_and_seed():
    spec = parse_spec({"method": "random", "parameters": {
        "model.r1_gamma": {"distribution": "log_uniform_values", "min": 0.5, "max": 32.0},
        "augmentation.target": {"distribution": "uniform", "min": 0.4, "max": 0.8},
        "seed": {"distribution": "int_uniform", "min": 0, "max": 3},
        "augmentation": {"values": ["ada", "apa"]}}})
    draws = sample_random(spec, 400, seed=1)
    assert draws == sample_random(spec, 400, seed=1) and draws != sample_random(spec, 400, seed=2)
    gammas = [d["model.r1_gamma"] for d in draws]
    assert all(0.5 <= g <= 32.0 for g in gammas)
    # log-uniform: the log of the draws is uniform on [log .5, log 32], mean log(4) = (log .5 + log 32)/2
    assert abs(sum(math.log(g) for g in gammas) / len(gammas) - math.log(4.0)) < 0.2
    assert all(0.4 <= d["augmentation.target"] <= 0.8 for d in draws)
    assert {d["seed"] for d in draws} == {0, 1, 2, 3}
    assert {d["augmentation"] for d in draws} == {"ada", "apa"}
    with pytest.raises(ConfigError, match="--count"):
        expand_local(spec)


def test_bad_specs_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="W&B sweep server"):
        expand_local(parse_spec({"method": "bayes", "metric": {"name": "fd/swav"},
                                 "parameters": {"seed": {"values": [0, 1]}}}))
    with pytest.raises(ConfigError, match="method"):
        parse_spec({"method": "hyperband", "parameters": {"seed": {"values": [0]}}})
    with pytest.raises(ConfigError, match="grid sweep needs"):
        parse_spec({"method": "grid", "parameters": {"seed": {"distribution": "int_uniform", "min": 0, "max": 3}}})
    bad_key = parse_spec({"method": "grid", "parameters": {"model.r1_gamm": {"values": [1.0]}}})
    with pytest.raises(ConfigError, match="model.r1_gamm"):
        validate_against_config(bad_key, CONF_DIR)
    bad_group = parse_spec({"method": "grid", "parameters": {"augmentation": {"values": ["ada", "adaa"]}}})
    with pytest.raises(ConfigError, match="adaa"):
        validate_against_config(bad_group, CONF_DIR)
    bad_type = parse_spec({"method": "random", "parameters": {"seed": {"distribution": "uniform", "min": 0, "max": 1}},
                           "name": "x"})
    validate_against_config(bad_type, CONF_DIR)  # seed is untyped in our config: floats compose
    good = parse_spec(yaml.safe_load((CONF_DIR / "sweep" / "augmentation.yaml").read_text()))
    validate_against_config(good, CONF_DIR)
    validate_against_config(parse_spec(yaml.safe_load((CONF_DIR / "sweep" / "study_grid.yaml").read_text())), CONF_DIR)


def test_sweep_cli_refuses_before_any_job(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("method: grid\nparameters:\n  eval.num_genn: {values: [16, 32]}\n")
    out = subprocess.run([sys.executable, str(REPO / "sweep.py"), str(spec), "--local", "--sweep-dir",
                          str(tmp_path / "sweep")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "eval.num_genn" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "sweep").exists()
    bayes = subprocess.run([sys.executable, str(REPO / "sweep.py"), str(CONF_DIR / "sweep" / "augmentation.yaml"),
                            "--local"], capture_output=True, text=True, timeout=300)
    assert bayes.returncode == 2 and "W&B sweep server" in bayes.stderr


def test_paper_experiment_composes_16_generators_times_11_extractors(compose_cfg):
    from fidmed.gan.train import training_fingerprint

    jobs = multirun_overrides(CONF_DIR, ["experiment=paper"])
    assert len(jobs) == 16
    seen, fingerprints = set(), set()
    for overrides in jobs:
        cfg = compose_cfg(overrides)
        assert set(cfg.extractor) == STUDY_EXTRACTORS and len(cfg.extractor) == 11
        assert {cfg.extractor[k].name for k in cfg.extractor} == STUDY_EXTRACTORS
        # REFERENCE.md section 3: 25,000 kimg, 5,000 for mri; stylegan2 (--cfg stylegan2); W&B grouped by modality
        assert cfg.schedule.kimg == (5000 if cfg.modality.name == "mri" else 25000)
        assert cfg.model.name == compose_cfg(["model=stylegan2"]).model.name and cfg.model.batch_size == 32
        assert cfg.logger.name == "wandb" and cfg.logger.group == cfg.modality.name
        assert list(cfg.eval.metrics)[:2] == ["fd", "rfd"] and cfg.eval.num_gen == 50000
        seen.add((cfg.modality.name, cfg.augmentation.name))
        fp = training_fingerprint(cfg)
        fingerprints.add(fp)
        # the extractor list is not part of the generator's identity: one training however many extractors
        assert training_fingerprint(compose_cfg([*overrides, "extractor=[swav]"])) == fp
    assert seen == set(itertools.product(["xray", "ct", "mri", "cardiac"], ["noaug", "ada", "apa", "diffaugment"]))
    assert len(fingerprints) == 16
    # the same 16 as the W&B study grid spec
    grid = expand_grid(parse_spec(yaml.safe_load((CONF_DIR / "sweep" / "study_grid.yaml").read_text())))
    assert {(t["modality"], t["augmentation"]) for t in grid} == seen


def test_paper_info_dry_run_lists_jobs_without_training(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "experiment=paper", f"paths.root={tmp_path}",
                          "--info", "config"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "outputs" / "train").exists()


def test_missing_launcher_plugin_names_the_fix(monkeypatch):
    import importlib.util

    check_launcher_available("submitit_slurm")  # installed here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install hydra-submitit-launcher"):
        check_launcher_available("submitit_slurm")
    check_launcher_available("basic")


@pytest.mark.slow
def test_sweep_local_runs_a_2x2_grid_of_smoke_jobs(tmp_path):
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "fd/inception_tf", "goal": "minimize"},
                                    "parameters": {"experiment": {"value": "smoke"}, "stage": {"value": "train"},
                                                   "seed": {"values": [0, 1]},
                                                   "eval.num_gen": {"values": [16, 24]}}}))
    env = {**os.environ, "FIDMED_WEIGHTS": str(tmp_path / "w"), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, str(REPO / "sweep.py"), str(spec), "--local", "--sweep-dir",
                          str(tmp_path / "sweep"), "--", f"paths.root={tmp_path}", "logger=wandb"], capture_output=True, text=True,
                         timeout=900, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = set()
    for i in range(4):
        job = tmp_path / "sweep" / str(i)
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        got.add((cfg["seed"], cfg["eval"]["num_gen"]))
        assert cfg["logger"]["name"] == "wandb" and cfg["logger"]["mode"] == "offline"
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # its own offline run, for `wandb sync`
    assert got == {(0, 16), (0, 24), (1, 16), (1, 24)}
    # two generators (seed 0, seed 1), each trained once and reused by the trial that differs in eval only
    assert len(list((tmp_path / "outputs" / "train").glob("*/final.pt"))) == 2
