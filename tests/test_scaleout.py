"""Scale-out: DDP training (2 CPU processes, gloo), submitit_local multiruns, failing jobs in a multirun."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO
from helpers.runpy import SMOKE as _SMOKE
from helpers.runpy import run_py as _run_py

SMOKE = [_SMOKE[0]]  # with W&B (offline): these tests look at the runs it writes


def test_ddp_child_runs_its_parents_job_not_the_sweep(monkeypatch):
    sys.path.insert(0, str(REPO))
    import run as run_module

    argv = ["run.py", "-m", "seed=0,1", "hydra.run.dir=x"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(
        run_module.DDP_JOB_ENV,
        json.dumps({"overrides": ["seed=1", "augmentation.policy='a,b'"], "run_dir": "/o/multi run/1"}),
    )
    assert run_module.ddp_child_argv(argv) == argv  # the parent (rank 0) keeps its command line
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = run_module.ddp_child_argv(argv)
    assert child == [
        "run.py",
        "seed=1",
        "augmentation.policy='a,b'",
        'hydra.run.dir="/o/multi run/1"',
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]


def test_launch_rank_reads_the_launchers_environment(monkeypatch):
    from fidmed.gan.train import launch_rank

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_rank() == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert launch_rank() != 0  # rank 0 of the second node is not the global rank 0
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert launch_rank() == 3
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a single-task SLURM job is not a DDP launch
    assert launch_rank() == 0


def test_datamodule_takes_rank_and_world_from_the_trainer():
    """Under DDP each rank's sampler shard comes from the attached trainer: the ranks' batches are disjoint and
    together are the single-process epoch prefix (same images, other order)."""
    from fidmed.data.datamodule import ImageDataModule, InfiniteSampler, build_dataset

    ds = build_dataset(
        {"name": "phantom", "kind": "phantom", "resolution": 8, "channels": 1, "num_images": 40, "data_seed": 0}
    )
    seen = []
    for rank in (0, 1):
        dm = ImageDataModule(ds, batch_size=4, seed=3)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        it = iter(dm.train_dataloader())
        seen.append(torch.cat([next(it) for _ in range(2)]))  # 2 steps of 4 images per rank
    key = lambda imgs: {bytes(x.numpy().tobytes()) for x in imgs}  # noqa: E731
    assert not key(seen[0]) & key(seen[1])
    order = InfiniteSampler(len(ds), rank=0, world_size=1, seed=3).epoch_order(0)[:16]
    assert key(seen[0]) | key(seen[1]) == key(torch.stack([ds[int(i)] for i in order]))


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_evaluate(tmp_path):
    # 2 steps x global batch 8 (smoke's model.batch_size) = 16 images; each of the 2 ranks takes 4 per step.
    out = run_py(
        tmp_path,
        *SMOKE,
        "logger=none",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "modality.num_workers=0",
        "schedule.kimg=0.016",
        "schedule.checkpoint_kimg=0.016",
        "eval.num_gen=16",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["results"][0]["protocol"]["n_gen"] == 16
    train_dir = Path(results["training"]["train_dir"])
    ckpt = torch.load(train_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert int(state["iteration"]) == 2 and int(state["images_seen"]) == 2 * 8  # per-rank batch 8 // 2 = 4
    assert torch.load(train_dir / "final.pt", weights_only=True)["images_seen"] == 16
    # one output folder: the rank-1 process wrote into the same run dir and no config of its own
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [".hydra", "results.json", "run.log", "training"]
    )
    # (the ranks' G/D/G_ema are checked equal at the end of training, fidmed.gan.train._check_ranks_agree)
    # Each rank draws from its own stream (seed * world + rank): after the same step their saved streams differ,
    # so the latents each draws first in the next step (the step's first random draw) differ too.
    from fidmed.gan.rng import RandomStream

    streams = ckpt["fidmed_random"]["ranks"]
    assert ckpt["fidmed_random"]["world_size"] == 2 and len(streams) == 2
    latents = []
    for state in streams:
        stream = RandomStream()
        stream.load_state_dict(state)
        with stream.active("cpu"):
            latents.append(torch.randn([4, 32]))  # rank batch 4, smoke's z_dim 32
    assert not torch.equal(latents[0], latents[1])


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_py(
        tmp_path,
        "-m",
        *SMOKE,
        "logger=none",
        "stage=train",
        "seed=0,1",
        "hydra/launcher=submitit_local",
        "hydra.launcher.gpus_per_node=0",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seeds = set()
    for job in ("0", "1"):
        cfg = yaml.safe_load((tmp_path / "multi" / job / ".hydra" / "config.yaml").read_text())
        seeds.add(cfg["seed"])
        assert (tmp_path / "multi" / job / "training" / "final.pt").is_file()
    assert seeds == {0, 1}
    assert len(list((tmp_path / "multi" / ".submitit").glob("*/*_result.pkl"))) == 2  # ran as 2 submitit jobs
    assert len(list((tmp_path / "outputs" / "train").glob("*/final.pt"))) == 2


@pytest.mark.slow
def test_failing_job_does_not_stop_the_others_and_finishes_its_wandb_run(tmp_path):
    # job 0: eval.num_real=1000 > the 64 smoke phantoms -> FidmedError after its tracker started;
    # job 1: a normal (train-only) job. Both with offline W&B in the same process (basic launcher).
    out = run_py(
        tmp_path,
        "-m",
        *SMOKE,
        "logger=wandb",
        "logger.log_images=false",
        "stage=train",
        "eval.num_real=1000,16",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    )
    # the sweep ran both jobs, and its exit status and closing summary say that one failed
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 job(s) of this multirun failed" in out.stderr and "eval.num_real" in out.stderr.split("failed")[-1]
    failed, ok = tmp_path / "multi" / "0", tmp_path / "multi" / "1"
    assert "eval.num_real" in (failed / "error.txt").read_text()
    assert (ok / "training" / "final.pt").is_file() and not (ok / "error.txt").exists()
    runs = [list((d / "wandb").glob("offline-run-*")) for d in (failed, ok)]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].name != runs[1][0].name  # one run each, none swallowed
    assert _exit_code(runs[0][0]) == 1 and _exit_code(runs[1][0]) == 0  # both finished; the failure marked


def _exit_code(run_dir: Path) -> int | None:
    """The exit code an offline W&B run was finished with, from its own debug log (None: never finished)."""
    import re

    text = (run_dir / "logs" / "debug.log").read_text()
    if "finishing run" not in text:
        return None
    codes = re.findall(r"got exitcode: (-?\d+)", text)
    return int(codes[-1]) if codes else None


def run_py(tmp_path: Path, *args: str, timeout: int = 900):
    return _run_py(tmp_path, *args, timeout=timeout, run_dir=False)
