"""Sweep specs -> Hydra overrides, local grid/random/bayes (Optuna's samplers, each trial's metric read from its
results.json), validation before any job, the paper's 16 x 11 grid, sweep.py."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fidmed.errors import ConfigError
from fidmed.sweep import (
    OptunaSearch,
    check_launcher_available,
    expand_grid,
    expand_local,
    main,
    multirun_overrides,
    parse_spec,
    sample_random,
    to_overrides,
    validate_against_config,
)

from conftest import CONF_DIR, REPO

# docs/study.md#modalities, docs/extractors.md: 7 ImageNet + 4 RadImageNet extractors ("Incept" = inception_tf).
STUDY_EXTRACTORS = {
    "inception_tf",
    "resnet",
    "swav",
    "dino",
    "swin",
    "irv2",
    "densenet",
    "radimagenet_inception",
    "radimagenet_resnet",
    "radimagenet_irv2",
    "radimagenet_densenet",
}


def _parse_override_value(line: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (ov,) = OverridesParser.create().parse_overrides([line])
    assert not ov.is_sweep_override(), line
    return ov.key_or_group, ov.value()


@pytest.mark.parametrize(
    "value",
    [
        "ada",
        "color,translation",
        "it's",
        "a=b",
        "1.0",
        "null",
        "x y",
        3,
        0.5,
        1e-05,
        True,
        None,
        [1, 2],
        ["color", "translation"],
        {"cutout": 0, "rotate": 0.5},
    ],
)
def test_override_translation_round_trips_through_hydras_parser(value):
    (line,) = to_overrides({"augmentation.policy": value})
    key, parsed = _parse_override_value(line)
    assert key == "augmentation.policy"
    assert parsed == value and type(parsed) is type(value)


def test_grid_expands_to_the_cartesian_product_in_order():
    spec = parse_spec(
        {
            "method": "grid",
            "parameters": {
                "experiment": {"value": "smoke"},
                "seed": {"values": [0, 1]},
                "augmentation": {"values": ["noaug", "ada", "apa"]},
            },
        }
    )
    trials = expand_grid(spec)
    expected = [
        {"experiment": "smoke", "seed": s, "augmentation": a}
        for s, a in itertools.product([0, 1], ["noaug", "ada", "apa"])
    ]
    assert trials == expected
    assert to_overrides(trials[4]) == ["experiment=smoke", "seed=1", "augmentation=ada"]
    assert expand_local(spec, count=2) == expected[:2]


def test_random_draws_respect_distributions_and_seed():
    spec = parse_spec(
        {
            "method": "random",
            "parameters": {
                "model.r1_gamma": {"distribution": "log_uniform_values", "min": 0.5, "max": 32.0},
                "augmentation.target": {"distribution": "uniform", "min": 0.4, "max": 0.8},
                "seed": {"distribution": "int_uniform", "min": 0, "max": 3},
                "augmentation": {"values": ["ada", "apa"]},
            },
        }
    )
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
    with pytest.raises(ConfigError, match="cannot be listed in advance"):
        expand_local(
            parse_spec({"method": "bayes", "metric": {"name": "fd/swav"}, "parameters": {"seed": {"values": [0, 1]}}})
        )
    with pytest.raises(ConfigError, match="<metric>/<extractor>"):
        parse_spec({"method": "bayes", "metric": {"name": "fd"}, "parameters": {"seed": {"values": [0, 1]}}})
    with pytest.raises(ConfigError, match="method"):
        parse_spec({"method": "hyperband", "parameters": {"seed": {"values": [0]}}})
    with pytest.raises(ConfigError, match="grid sweep needs"):
        parse_spec({"method": "grid", "parameters": {"seed": {"distribution": "int_uniform", "min": 0, "max": 3}}})
    bad_key = parse_spec({"method": "grid", "parameters": {"model.r1_gamm": {"values": [1.0]}}})
    with pytest.raises(ConfigError, match="model.r1_gamm"):
        validate_against_config(bad_key)
    bad_group = parse_spec({"method": "grid", "parameters": {"augmentation": {"values": ["ada", "adaa"]}}})
    with pytest.raises(ConfigError, match="adaa"):
        validate_against_config(bad_group)
    bad_type = parse_spec(
        {"method": "random", "parameters": {"seed": {"distribution": "uniform", "min": 0, "max": 1}}, "name": "x"}
    )
    validate_against_config(bad_type)  # the bounds 0 and 1 are integers: they compose into the int seed
    bad_float = parse_spec(
        {"method": "random", "parameters": {"seed": {"distribution": "uniform", "min": 0.5, "max": 1.5}}}
    )
    with pytest.raises(ConfigError, match="'seed' value 0.5"):
        validate_against_config(bad_float)
    good = parse_spec(yaml.safe_load((CONF_DIR / "sweep" / "augmentation.yaml").read_text()))
    assert validate_against_config(good) == []
    assert (
        validate_against_config(parse_spec(yaml.safe_load((CONF_DIR / "sweep" / "study_grid.yaml").read_text()))) == []
    )
    # a bayes metric the jobs would not make has nothing to learn from: refused, naming the fix
    no_swav = parse_spec({"method": "bayes", "metric": {"name": "fd/swav"}, "parameters": {"seed": {"values": [0, 1]}}})
    with pytest.raises(
        ConfigError,
        match=r"evaluate extractor\(s\) inception_tf, not swav; add "
        r"extractor=\[inception_tf,swav\]",
    ):
        validate_against_config(no_swav)
    validate_against_config(no_swav, ["extractor=[swav]"])  # the fix, after --
    with pytest.raises(ConfigError, match="add prdc to eval.metrics"):
        validate_against_config(
            parse_spec(
                {
                    "method": "bayes",
                    "metric": {"name": "precision/inception_tf"},
                    "parameters": {"seed": {"values": [0, 1]}},
                }
            )
        )
    notes = validate_against_config(
        parse_spec({"method": "grid", "metric": {"name": "fd/dino"}, "parameters": {"seed": {"values": [0, 1]}}})
    )
    assert len(notes) == 1 and "not dino" in notes[0]


def test_sweep_cli_refuses_before_any_job(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("method: grid\nparameters:\n  eval.num_genn: {values: [16, 32]}\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "sweep.py"), str(spec), "--local", "--sweep-dir", str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "eval.num_genn" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "sweep").exists()
    bayes = subprocess.run(
        [
            sys.executable,
            str(REPO / "sweep.py"),
            str(CONF_DIR / "sweep" / "augmentation.yaml"),
            "--local",
            "--sweep-dir",
            str(tmp_path / "sweep"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bayes.returncode == 2 and "needs --count N" in bayes.stderr and "Traceback" not in bayes.stderr
    assert not (tmp_path / "sweep").exists()


def test_paper_experiment_composes_16_generators_times_11_extractors(compose_cfg):
    from fidmed.gan.train import training_fingerprint

    jobs = multirun_overrides(["experiment=paper"])
    assert len(jobs) == 16
    seen, fingerprints = set(), set()
    for overrides in jobs:
        cfg = compose_cfg(overrides)
        assert set(cfg.extractor) == STUDY_EXTRACTORS and len(cfg.extractor) == 11
        assert {cfg.extractor[k].name for k in cfg.extractor} == STUDY_EXTRACTORS
        # docs/study.md#training: 25,000 kimg, 5,000 for mri; stylegan2 (--cfg stylegan2); W&B grouped by modality
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
    out = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "experiment=paper", f"paths.root={tmp_path}", "--info", "config"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
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
    spec.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "metric": {"name": "fd/inception_tf", "goal": "minimize"},
                "parameters": {
                    "experiment": {"value": "smoke"},
                    "stage": {"value": "train"},
                    "seed": {"values": [0, 1]},
                    "eval.num_gen": {"values": [16, 24]},
                },
            }
        )
    )
    env = {**os.environ, "FIDMED_WEIGHTS": str(tmp_path / "w"), "WANDB_MODE": "offline"}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "sweep.py"),
            str(spec),
            "--local",
            "--sweep-dir",
            str(tmp_path / "sweep"),
            "--",
            f"paths.root={tmp_path}",
            "logger=wandb",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
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


# ------------------------------------------------------------------------------------------------------------
# Local random and bayes through the engine, each trial's metric read back from its results.json


def test_bayes_engine_proposes_from_the_reported_metrics():
    spec = parse_spec(yaml.safe_load((CONF_DIR / "sweep" / "augmentation.yaml").read_text()))

    def proposals(reported):
        search = OptunaSearch(spec, len(reported) + 1, seed=0)
        out = []
        for value in reported:
            p = search.propose()
            out.append(p.params)
            search.report(p, value)
        out.append(search.propose().params)
        return out, search.study

    a, study = proposals([1.0, 2.0])
    b, _ = proposals([2.0, 1.0])
    assert a[:2] == b[:2]  # the same seed: the same first proposals
    assert a[2] != b[2]  # the third comes from the results: swapping them moves it
    assert [t.value for t in study.trials[:2]] == [1.0, 2.0]
    for params in a + b:
        assert params["extractor"] == ["swav"] and params["augmentation"] in ("ada", "apa")
        assert 0.5 <= params["model.r1_gamma"] <= 32.0 and 0.4 <= params["augmentation.target"] <= 0.8
    failed = OptunaSearch(spec, 1, seed=0)
    failed.report(failed.propose(), None)  # a failed trial is told as failed, not as a number
    assert failed.study.trials[0].state.name == "FAIL"


FAKE_RUN = r"""
import json, math, pathlib, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
run_dir = pathlib.Path(args["hydra.run.dir"])
(run_dir / ".hydra").mkdir(parents=True)
(run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {a}\n" for a in sys.argv[1:] if not a.startswith("hydra.")))
seed = int(args.get("seed", 0))
if seed == 1:
    print("training: 10%", file=sys.stderr)
    print("\nfidmed: error: seed 1 cannot run here\nuse another seed", file=sys.stderr)
    sys.exit(2)
value = (math.log(float(args.get("model.r1_gamma", 1.0))) - math.log(4.0)) ** 2 + seed
(run_dir / "results.json").write_text(json.dumps({"modality": "phantom", "augmentation": "noaug", "results": [
    {"extractor": "inception_tf", "metric": "fd", "value": value, "label": "inception_tf [RANDOM-INIT]",
     "protocol": {"random_init": True}, "context": {"modality": "phantom", "augmentation": "noaug"}}]}))
"""


def fake_objective(overrides: str) -> float:
    args = dict(o.split("=", 1) for o in overrides.split())
    return (math.log(float(args.get("model.r1_gamma", 1.0))) - math.log(4.0)) ** 2 + int(args.get("seed", 0))


def run_fake_sweep(tmp_path, name, spec, *argv):
    import csv

    (tmp_path / name).write_text(yaml.safe_dump(spec))
    run_script = tmp_path / "fake_run.py"
    run_script.write_text(FAKE_RUN)
    rc = main(
        [str(tmp_path / name), "--local", "--sweep-dir", str(tmp_path / name.removesuffix(".yaml")), *argv],
        run_script=run_script,
    )
    with open(tmp_path / name.removesuffix(".yaml") / "trials.csv") as f:
        return rc, list(csv.DictReader(f))


def test_local_sweeps_read_each_trials_metric_and_keep_failures(tmp_path, capsys):
    from fidmed.analysis.collect import collect

    metric = {"name": "fd/inception_tf", "goal": "minimize"}
    # grid: every value in order; the failed trial is reported, leaves error.txt, and the sweep goes on (exit 1)
    rc, rows = run_fake_sweep(
        tmp_path, "grid.yaml", {"method": "grid", "metric": metric, "parameters": {"seed": {"values": [0, 1, 2]}}}
    )
    assert rc == 1
    assert [(r["trial"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "ok", "seed=0"),
        ("1", "failed", "seed=1"),
        ("2", "ok", "seed=2"),
    ]
    assert float(rows[0]["value"]) == fake_objective("seed=0") and float(rows[2]["value"]) == fake_objective("seed=2")
    assert rows[0]["random_init"] == "True"
    assert rows[1]["error"] == "seed 1 cannot run here\nuse another seed" and rows[1]["value"] == ""
    assert (tmp_path / "grid" / "1" / "error.txt").read_text() == "seed 1 cannot run here\nuse another seed\n"
    err = capsys.readouterr().err
    assert "1 of 3 trial(s) failed: [1]" in err and "training: 10%" in err  # the trial's own output passed through
    # the sweep's folder is a results table, the failed trial a row with its overrides and error
    c = collect([tmp_path / "grid"])
    assert [r["status"] for r in c.rows] == ["ok", "failed", "ok"]
    assert c.rows[1]["overrides"].split()[0] == "seed=1" and c.rows[1]["error"].startswith("seed 1 cannot run here")

    params = {
        "model.r1_gamma": {"distribution": "log_uniform_values", "min": 0.5, "max": 32.0},
        "seed": {"values": [0, 2]},
    }
    # random: the trials are the engine's seeded draws (what --dry-run lists), each metric read back
    spec = {"method": "random", "metric": metric, "parameters": params}
    rc, rows = run_fake_sweep(tmp_path, "random.yaml", spec, "--count", "3", "--seed", "5")
    assert rc == 0 and [r["status"] for r in rows] == ["ok"] * 3
    assert [r["overrides"] for r in rows] == [
        " ".join(to_overrides(t)) for t in sample_random(parse_spec(spec), 3, seed=5)
    ]
    assert [float(r["value"]) for r in rows] == [fake_objective(r["overrides"]) for r in rows]
    # bayes: the same, each proposal made after the previous trials' metrics were reported
    rc, rows = run_fake_sweep(
        tmp_path, "bayes.yaml", {"method": "bayes", "metric": metric, "parameters": params}, "--count", "3"
    )
    assert rc == 0 and [r["status"] for r in rows] == ["ok"] * 3
    assert [float(r["value"]) for r in rows] == [fake_objective(r["overrides"]) for r in rows]
    assert "best: trial" in capsys.readouterr().out
    # the sweep folder is never reused: trials would mix
    assert (
        main(
            [str(tmp_path / "bayes.yaml"), "--local", "--count", "1", "--sweep-dir", str(tmp_path / "bayes")],
            run_script=tmp_path / "fake_run.py",
        )
        == 2
    )
    assert "already exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_bayes_spec_runs_locally_with_smoke_jobs(tmp_path):
    """`python sweep.py conf/sweep/augmentation.yaml --local --count N` (the README's command), smoke-sized."""
    import csv

    env = {**os.environ, "FIDMED_WEIGHTS": str(tmp_path / "w"), "WANDB_MODE": "offline"}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "sweep.py"),
            str(CONF_DIR / "sweep" / "augmentation.yaml"),
            "--local",
            "--count",
            "2",
            "--sweep-dir",
            str(tmp_path / "sweep"),
            "--",
            "experiment=smoke",
            f"paths.root={tmp_path}",
            "modality.num_images=16",
            "eval.num_gen=16",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    trials = tmp_path / "sweep" / "trials.csv"
    assert out.returncode == 0, (trials.read_text() if trials.is_file() else "") + out.stderr[-3000:]
    with open(trials) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["overrides"] != rows[1]["overrides"]
    for i, row in enumerate(rows):
        payload = json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text())
        rec = next(r for r in payload["results"] if (r["metric"], r["extractor"]) == ("fd", "swav"))
        assert float(row["value"]) == rec["value"] and row["random_init"] == "True"  # smoke: random-init swav
        cfg = yaml.safe_load((tmp_path / "sweep" / str(i) / ".hydra" / "config.yaml").read_text())
        assert cfg["augmentation"]["name"] in ("ada", "apa") and 0.5 <= cfg["model"]["r1_gamma"] <= 32.0
    assert "fd/swav [RANDOM-INIT] = " in out.stdout and "best: trial" in out.stdout


def test_agent_trial_runs_the_job_as_run_py_would_and_keeps_its_error(tmp_path, monkeypatch):
    """An online trial: the W&B run's parameters composed into the job's config, ${hydra:...} paths resolved to the
    trial's folder, logging into the trial's run; a failed job leaves error.txt there (fidmed collect reads it)."""
    import wandb

    import fidmed.job
    from fidmed.errors import FidmedError
    from fidmed.sweep import agent_trial

    class FakeRun:
        config = {"experiment": "smoke", "seed": 3}
        sweep_id, id, name = "sweep1", "run1", "trial-1"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun())
    seen = {}

    def fake_job(cfg, run_dir, job_name):
        seen.update(
            seed=cfg.seed,
            logger=(cfg.logger.name, cfg.logger.mode),
            run_dir=Path(run_dir),
            paths=(cfg.paths.root, cfg.paths.run_dir),
            name=job_name,
        )
        raise FidmedError("no weights here: fidmed weights import FILE")

    monkeypatch.setattr(fidmed.job, "run_job", fake_job)
    agent_trial(["eval.num_gen=16"], "proj", None)
    folder = tmp_path / "outputs" / "sweeps" / "sweep1" / "run1"
    assert seen == {
        "seed": 3,
        "logger": ("wandb", "online"),
        "run_dir": Path("outputs/sweeps/sweep1/run1"),
        "paths": (str(tmp_path), str(folder)),
        "name": "trial-1",
    }
    assert (folder / "overrides.txt").read_text().split() == [
        "eval.num_gen=16",
        "experiment=smoke",
        "seed=3",
        "logger=wandb",
        "logger.mode=online",
    ]
    assert (folder / "error.txt").read_text() == "no weights here: fidmed weights import FILE\n"
