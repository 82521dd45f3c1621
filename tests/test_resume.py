"""A training run killed with SIGKILL and resumed is bitwise the run it resumes: same final.pt, snapshots, last.ckpt,
FD history and FD as a run that was never interrupted (CPU, one thread, same machine).

The end-to-end tests run ``run.py`` in subprocesses through :func:`driver`, which makes the process SIGKILL itself
at a chosen point: ``step:N`` in the middle of the training step that starts at N images (after its G and D
updates, before its EMA update and counters), ``checkpoint:N`` right after ``last.ckpt`` and the snapshot at N
images are written (before the evaluation of that step).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from helpers.training import cpu_trainer

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------------
# The subprocess side.
def driver(argv: list[str]) -> None:
    """``driver(["step:40", *run_py_overrides])``: run ``run.py`` with the overrides, SIGKILLed at the given point
    (``none``: not at all)."""
    import runpy

    from fidmed.gan import callbacks as callbacks_mod
    from fidmed.gan import module as module_mod

    kill, overrides = argv[0], argv[1:]
    where, _, at = kill.partition(":")
    at = int(at or -1)

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":
        update_ema = module_mod.StyleGAN2Module._update_ema

        def killing_update_ema(self, batch_size):
            if int(self.images_seen) == at:
                die()
            return update_ema(self, batch_size)

        module_mod.StyleGAN2Module._update_ema = killing_update_ema
    elif where == "checkpoint":
        save = callbacks_mod.SnapshotCallback.save

        def killing_save(self, trainer, pl_module):
            out = save(self, trainer, pl_module)
            if int(pl_module.images_seen) == at:
                die()
            return out

        callbacks_mod.SnapshotCallback.save = killing_save
    elif where != "none":
        raise SystemExit(f"unknown kill point {kill!r}")
    sys.argv = [str(REPO / "run.py"), *overrides]
    runpy.run_path(str(REPO / "run.py"), run_name="__main__")


def drive(root: Path, run: str, kill: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "FIDMED_WEIGHTS": str(root.parent / "weights"),
        "HF_HUB_OFFLINE": "1",
        "FIDMED_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TORCH_HOME": str(root.parent / "torch_home"),
        # bitwise needs the same thread count in every run; one thread is also the fastest for these sizes
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for var in ("LOCAL_RANK", "FIDMED_DDP_JOB", "RANK"):
        env.pop(var, None)
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; import test_resume; "
        f"test_resume.driver(sys.argv[1:])"
    )
    args = [
        sys.executable,
        "-c",
        code,
        kill,
        f"hydra.run.dir={root / run}",
        f"paths.root={root}",
        f"paths.cache_dir={root.parent / 'cache'}",
        *overrides,
    ]
    return subprocess.run(args, cwd=root.parent, capture_output=True, text=True, timeout=600, env=env)


# --------------------------------------------------------------------------------------------------------
# Comparison of two training folders.
def _train_dir(root: Path) -> Path:
    (folder,) = (root / "outputs" / "train").iterdir()
    return folder


def _assert_same(a, b, where: str) -> None:
    """Bitwise equality of nested checkpoint contents (tensors with torch.equal, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: largest difference {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(reference: Path, resumed: Path) -> None:
    ref, res = _train_dir(reference), _train_dir(resumed)
    assert ref.name == res.name  # same fingerprint
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    a, b = load(ref / "final.pt"), load(res / "final.pt")
    a.pop("train_seconds"), b.pop("train_seconds")
    _assert_same(a, b, "final.pt")
    snaps = sorted(p.name for p in (ref / "checkpoints").glob("network-snapshot-*.pt"))
    assert snaps == sorted(p.name for p in (res / "checkpoints").glob("network-snapshot-*.pt"))
    for name in snaps:
        _assert_same(load(ref / "checkpoints" / name), load(res / "checkpoints" / name), name)
    # the full training state of the last checkpoint too: weights, optimiser moments, augmentation controller,
    # random streams and sampler position
    ca, cb = load(ref / "checkpoints" / "last.ckpt"), load(res / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "optimizer_states", "fidmed", "fidmed_random", "ImageDataModule", "global_step"):
        _assert_same(ca[key], cb[key], f"last.ckpt[{key}]")
    history = [(d / "fd_history.jsonl").read_text() if (d / "fd_history.jsonl").is_file() else None for d in (ref, res)]
    assert history[0] == history[1]


def _fd(run_dir: Path) -> dict[str, float]:
    results = json.loads((run_dir / "results.json").read_text())
    return {f"{r['metric']}/{r['extractor']}": r["value"] for r in results["results"]}


def _images_seen(root: Path) -> int | None:
    ckpt = _train_dir(root) / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]["images_seen"])


def _wait_for_orphans(root: Path, timeout: float = 120) -> None:
    """Under DDP the other rank is a process of its own; after rank 0 was killed it stops on its broken process
    group. Wait for it (and end it, by its pid, if it hangs), so that it cannot write into the next run."""
    import time

    deadline = time.time() + timeout
    while True:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(root).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
        if not pids:
            return
        if time.time() > deadline:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes of a killed run still ran after {timeout} s: {pids}")
        time.sleep(0.5)


def kill_and_resume(tmp_path: Path, kills: list[tuple[str, int | None]], *overrides: str) -> None:
    """An uninterrupted run, and a run killed at each of ``kills`` (with the images ``last.ckpt`` must then hold)
    and resumed to the end; both train, evaluate during training and (unless ``stage=train``) evaluate
    ``final.pt``."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference.mkdir(), resumed.mkdir()
    out = drive(reference, "run", "none", *overrides)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for i, (kill, images_in_checkpoint) in enumerate(kills):
        out = drive(resumed, f"killed{i}", kill, *overrides)
        assert out.returncode == -signal.SIGKILL, (kill, out.returncode, out.stdout[-3000:] + out.stderr[-3000:])
        _wait_for_orphans(resumed)
        assert _images_seen(resumed) == images_in_checkpoint, kill
        assert not (_train_dir(resumed) / "final.pt").exists()
    out = drive(resumed, "run", "none", *overrides)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming training from" in out.stdout + out.stderr
    assert_same_training(reference, resumed)
    if "stage=train" not in overrides:
        fd_ref, fd_res = _fd(reference / "run"), _fd(resumed / "run")
        assert fd_ref and fd_ref == fd_res  # exactly equal, not approximately


# 8 steps of 8 images; last.ckpt and a snapshot every 16 images, FD every 32 (and at 0 and at the end).
TINY_RUN = [
    "experiment=smoke",
    "logger=none",
    "schedule.kimg=0.064",
    "schedule.checkpoint_kimg=0.016",
    "schedule.eval_kimg=0.032",
    "eval.num_gen=16",
    "eval.num_gen_training=8",
    "eval.metrics=[fd]",
]


def test_killed_and_resumed_training_is_bitwise_the_uninterrupted_run(tmp_path):
    # ADA: latents, style mixing, noise inputs, path-length noise and augmentation draws all in play.
    kill_and_resume(
        tmp_path,
        [
            ("step:8", None),  # before the first checkpoint
            ("checkpoint:32", 32),  # right after one (before its FD evaluation)
            ("step:40", 32),
        ],  # between two, in the middle of a step
        *TINY_RUN,
        "augmentation=ada",
    )


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["apa", "diffaugment"])
def test_killed_and_resumed_training_is_bitwise_with_loader_workers(tmp_path, augmentation):
    # Loader workers prefetching batches past the kill, APA's fakes / DiffAugment, a kill in the very first step,
    # and one after the last checkpoint but before final.pt.
    kill_and_resume(
        tmp_path,
        [
            ("step:0", None),
            ("checkpoint:16", 16),
            ("step:24", 16),
            ("checkpoint:48", 48),
            ("step:56", 48),
            ("checkpoint:64", 64),
        ],
        *TINY_RUN,
        f"augmentation={augmentation}",
        "modality.num_workers=2",
    )


@pytest.mark.slow
def test_killed_and_resumed_ddp_training_is_bitwise(tmp_path):
    # 2 CPU ranks (gloo): rank 0 is killed, rank 1 stops on the broken process group; every rank's random stream
    # is gathered into rank 0's checkpoint and handed back to its rank, and the evaluation decision is broadcast.
    kill_and_resume(
        tmp_path,
        [("step:16", 16), ("checkpoint:32", 32)],
        "experiment=smoke",
        "logger=none",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "modality.num_workers=0",
        "schedule.kimg=0.032",
        "schedule.checkpoint_kimg=0.016",
        "schedule.eval_kimg=0.016",
        "eval.num_gen=16",
        "eval.num_gen_training=8",
        "eval.metrics=[fd]",
        "augmentation=ada",
    )


# --------------------------------------------------------------------------------------------------------
# The pieces, in process.
def _draws() -> tuple:
    """One draw from each generator a training step may use."""
    return (
        torch.randn(3),
        torch.empty(2, dtype=torch.int64).random_(0, 99),
        torch.from_numpy(np.random.rand(2)),
        random.random(),
    )


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)


def test_random_stream_continues_exactly_after_a_checkpoint_round_trip(tmp_path):
    from fidmed.gan.rng import RandomStream

    _seed_all(1)
    stream = RandomStream()
    with stream.active("cpu"):
        first = _draws()
    torch.save(stream.state_dict(), tmp_path / "s.pt")
    with stream.active("cpu"):
        expected = _draws()
    assert not torch.equal(first[0], expected[0])

    _seed_all(7)  # a new process, seeded again
    resumed = RandomStream()
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))  # tensors and plain values only
    _draws()  # whatever the process draws outside the stream
    with resumed.active("cpu"):
        got = _draws()
    _assert_same(got, expected, "stream draws after the round trip")


def test_random_stream_leaves_the_global_generators_alone():
    from fidmed.gan.rng import RandomStream

    _seed_all(7)
    _draws()
    without = _draws()
    _seed_all(7)
    _draws()
    with RandomStream().active("cpu"):
        _draws()
    _assert_same(_draws(), without, "global draws after a stream block")


def test_first_use_of_a_stream_continues_the_global_generators():
    """A fresh run draws what it drew before streams existed (so earlier generators keep their fingerprint)."""
    from fidmed.gan.rng import RandomStream, fork_random_state

    torch.manual_seed(3)
    with fork_random_state():
        expected = torch.randn(5)
    with RandomStream().active("cpu"):
        got = torch.randn(5)
    assert torch.equal(got, expected)
    assert torch.equal(torch.randn(5), expected)  # fork_random_state put the global generator back


def _batches_of_training(datamodule, steps: int) -> list[torch.Tensor]:
    """The batches the training steps of a real ``Trainer(max_steps=steps)`` receive from ``datamodule``."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.batches: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.batches.append(batch.clone())
            return (self.weight * batch.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = Recorder()
    trainer = cpu_trainer(steps)
    trainer.fit(model, datamodule=datamodule)
    return model.batches


def test_datamodule_resumes_the_sample_order_mid_epoch():
    from fidmed.data.datamodule import ImageDataModule, build_dataset

    ds = build_dataset(
        {"name": "phantom", "kind": "phantom", "resolution": 8, "channels": 1, "num_images": 10, "data_seed": 0}
    )
    dm = ImageDataModule(ds, batch_size=3, seed=5, xflip=True)
    trained = _batches_of_training(dm, steps=5)  # 15 of 20 images: mid-epoch 0 (Lightning prefetched one batch more)
    state = dm.state_dict()
    assert state["position"] == 15  # the prefetched batch no step used does not count

    resumed = ImageDataModule(ds, batch_size=3, seed=5, xflip=True)
    resumed.load_state_dict(state)
    got = _batches_of_training(resumed, steps=4)  # crosses into epoch 1 (another permutation)
    uninterrupted = iter(ImageDataModule(ds, batch_size=3, seed=5, xflip=True).train_dataloader())
    stream = [next(uninterrupted) for _ in range(9)]
    assert len(trained) == 5 and all(torch.equal(x, y) for x, y in zip(trained, stream[:5]))
    assert len(got) == 4 and all(torch.equal(x, y) for x, y in zip(got, stream[5:]))
    # another world size: the same point of training (images per rank), not the same images
    two = ImageDataModule(ds, batch_size=3, seed=5, xflip=True, rank=1, world_size=2)
    two.load_state_dict(state)
    assert two.start == 15 // 2


def test_evaluation_history_is_cut_back_and_the_missing_point_evaluated(tmp_path):
    from fidmed.gan.callbacks import PeriodicEvaluation

    history = tmp_path / "fd_history.jsonl"
    ev = PeriodicEvaluation(0.032, evaluate=None, history_path=history)
    assert ev._resume_history(0, 64)  # fresh: the untrained generator
    history.write_text("".join(json.dumps({"kimg": k, "fd": 1.0}) + "\n" for k in (0.0, 0.032, 0.048)))
    # killed after the checkpoint at 32 and after evaluating at 48: 48 is cut, 32 is there
    assert not ev._resume_history(32, 64)
    assert [json.loads(line)["kimg"] for line in history.read_text().splitlines()] == [0.0, 0.032]
    assert not ev._resume_history(40, 64)  # the 32-boundary was evaluated by the step that reached 32
    history.write_text(json.dumps({"kimg": 0.0, "fd": 1.0}) + "\n")
    assert ev._resume_history(40, 64)  # the step reaching 40 crossed 32 and its evaluation is missing
    assert not ev._resume_history(24, 64)
    assert ev._resume_history(64, 64)  # the last step always evaluates
    assert not ev._resume_history(0, 64)  # a run killed before its first checkpoint evaluated 0 already
