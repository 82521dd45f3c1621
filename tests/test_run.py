"""End to end: run.py trains, evaluates and writes its outputs; reuse, resume and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from helpers.runpy import SMOKE, run_py


def test_smoke_job_trains_evaluates_and_labels_random_weights(tmp_path):
    out = run_py(tmp_path, *SMOKE)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    recs = {(r["extractor"], r["metric"]): r for r in results["results"]}
    fd = recs[("inception_tf", "fd")]
    assert fd["value"] > 0 and fd["protocol"]["random_init"] is True
    assert "RANDOM-INIT" in fd["label"] and "RANDOM-INIT" in fd["protocol"]["weights"]
    assert fd["protocol"]["n_gen"] == 32 and fd["protocol"]["n_real"] == 64 and fd["protocol"]["seeds"] == "0-31"
    assert fd["details"]["route"] == "nuclear"  # n < d = 2048
    rfd = recs[("inception_tf", "rfd")]
    assert rfd["value"] == pytest.approx(fd["value"] / rfd["details"]["fd_real_split"])
    assert "RANDOM-INIT" in out.stdout  # the printed table says so too
    train_dir = Path(results["training"]["train_dir"])
    assert (train_dir / "final.pt").is_file() and (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "run" / "training" / "checkpoints" / "last.ckpt").is_file()  # link to the shared folder

    # Same training settings, other evaluation settings: the trained generator is reused, not retrained.
    mtime = (train_dir / "final.pt").stat().st_mtime_ns
    again = run_py(tmp_path, *SMOKE, "eval.num_gen=40", "eval.metrics=[fd]", f"hydra.run.dir={tmp_path / 'run2'}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (train_dir / "final.pt").stat().st_mtime_ns == mtime
    second = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert [r["metric"] for r in second["results"]] == ["fd"]
    assert second["results"][0]["protocol"]["n_gen"] == 40

    # stage=evaluate on the snapshot gives the same FD as the job that trained it (same seeds, same real set).
    ev = run_py(
        tmp_path, *SMOKE, "stage=evaluate", f"generator={train_dir / 'final.pt'}", f"hydra.run.dir={tmp_path / 'run3'}"
    )
    assert ev.returncode == 0, ev.stdout + ev.stderr
    third = json.loads((tmp_path / "run3" / "results.json").read_text())
    assert third["results"][0]["value"] == pytest.approx(fd["value"], rel=1e-9)


def test_real_weights_missing_offline_stops_before_training_with_the_fix(tmp_path):
    out = run_py(tmp_path, "experiment=smoke", "eval.weights=pretrained", timeout=120)
    assert out.returncode == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in out.stderr
    assert "fidmed weights import" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train").rglob("*.ckpt"))


def test_missing_generator_file_is_a_clear_error(tmp_path):
    out = run_py(tmp_path, *SMOKE, "stage=evaluate", f"generator={tmp_path / 'nope.pt'}", timeout=120)
    assert out.returncode == 2 and "generator file not found" in out.stderr and "Traceback" not in out.stderr


def test_multirun_cartesian_product(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FIDMED_OFFLINE": "1", "WANDB_MODE": "offline"}
    args = [
        sys.executable,
        str(REPO / "run.py"),
        "-m",
        "experiment=smoke",
        "logger=wandb",
        "seed=0,1",
        "schedule.kimg=0.016,0.032",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
        f"paths.root={tmp_path}",
    ]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    results = sorted((tmp_path / "multi").glob("*/results.json"))
    assert len(results) == 4
    payloads = [json.loads(p.read_text()) for p in results]
    assert len({p["training"]["fingerprint"] for p in payloads}) == 4
    assert sorted(p["training"]["kimg"] for p in payloads) == [0.016, 0.016, 0.032, 0.032]
    # one offline W&B run per job (none swallowed by another), each with its results table and sample grid,
    # and each finished by its own job with exit code 0 (`wandb sync` uploads it later)
    for job_dir in sorted((tmp_path / "multi").glob("[0-9]*")):
        runs = list((job_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, job_dir
        run = runs[0]
        assert list(run.glob("*.wandb")) and list(run.glob("files/media/table/results_*.table.json"))
        assert list(run.glob("files/media/images/samples_*.png"))
        debug = (run / "logs" / "debug.log").read_text()
        assert "finishing run" in debug and "got exitcode: 0" in debug


def test_crashed_training_resumes_and_continues_the_kimg_counter(compose_cfg, monkeypatch):
    from fidmed.data.datamodule import build_dataset
    from fidmed.gan import module as module_mod
    from fidmed.gan.train import train_dir_for, train_or_reuse
    from fidmed.tracking import Tracker

    cfg = compose_cfg(SMOKE + ["schedule.kimg=0.064", "schedule.checkpoint_kimg=0.016"])
    dataset = build_dataset(cfg.modality)
    original = module_mod.StyleGAN2Module.training_step
    calls = []

    def crashing(self, batch, batch_idx):
        if int(self.images_seen) >= 32:
            raise RuntimeError("simulated crash")
        calls.append(int(self.images_seen))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_mod.StyleGAN2Module, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_or_reuse(cfg, dataset, Tracker())
    train_dir = train_dir_for(cfg)
    assert not (train_dir / "final.pt").exists()
    saved = torch.load(train_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(saved["state_dict"]["images_seen"]) == 32

    calls.clear()

    def counting(self, batch, batch_idx):
        calls.append(int(self.images_seen))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_mod.StyleGAN2Module, "training_step", counting)
    final = train_or_reuse(cfg, dataset, Tracker())
    assert calls == [32, 40, 48, 56]  # resumed where it stopped, not from 0
    record = torch.load(final, map_location="cpu", weights_only=True)
    assert record["images_seen"] == 64


def test_resume_from_an_incompatible_checkpoint_is_refused(compose_cfg):
    from fidmed.data.datamodule import build_dataset
    from fidmed.errors import FidmedError
    from fidmed.gan.train import train_dir_for, train_or_reuse
    from fidmed.tracking import Tracker

    cfg = compose_cfg(SMOKE)
    ckpt = train_dir_for(cfg) / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"fidmed": {"fingerprint": "0" * 64}, "state_dict": {}}, ckpt)
    with pytest.raises(FidmedError, match="another training configuration"):
        train_or_reuse(cfg, build_dataset(cfg.modality), Tracker())
