"""The LightningModule under a real Trainer: one training step, optimiser scaling, EMA, every backward pass through
Lightning, hyperparameters that rebuild it from last.ckpt, DDP random streams; the training fingerprint (pinned for
existing configurations); the checks before training starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from fidmed.errors import ConfigError, FidmedError
from fidmed.gan.module import StyleGAN2Module, training_phases

from helpers.training import TINY_MODEL as TINY
from helpers.training import cpu_trainer

SMOKE = ["experiment=smoke", "logger=none"]


def tiny_module(seed: int = 0, **over) -> StyleGAN2Module:
    torch.manual_seed(0)
    return StyleGAN2Module(OmegaConf.create({**TINY, **over}), resolution=16, channels=1, kimg=1.0, seed=seed)


def test_phases_follow_the_reference():
    names = [(p.name, p.interval) for p in training_phases(4, 16)]
    assert names == [("Gmain", 1), ("Greg", 4), ("Dmain", 1), ("Dreg", 16)]
    assert [(p.name, p.interval) for p in training_phases(None, None)] == [("Gboth", 1), ("Dboth", 1)]


def test_lazy_regularisation_scales_the_optimisers():
    opt_g, opt_d = tiny_module().configure_optimizers()
    rg, rd = 4 / 5, 16 / 17
    assert opt_g.defaults["lr"] == pytest.approx(0.002 * rg)
    assert opt_g.defaults["betas"] == pytest.approx((0.0, 0.99**rg))
    assert opt_d.defaults["lr"] == pytest.approx(0.002 * rd)
    assert opt_d.defaults["betas"] == pytest.approx((0.0, 0.99**rd))


def fit_one_step(module: StyleGAN2Module, batch: torch.Tensor, callbacks=()) -> L.Trainer:
    """One training iteration under a real Trainer (``max_steps=1`` ends fit() after the first iteration, whose
    optimiser steps are G main, G reg, D main and D reg)."""
    loader = torch.utils.data.DataLoader(list(batch), batch_size=len(batch))
    trainer = cpu_trainer(1, callbacks=list(callbacks))
    trainer.fit(module, loader)
    return trainer


def test_one_training_step_changes_g_d_and_ema_and_counts_images(one_cpu_thread):
    m = tiny_module()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batch = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    fit_one_step(m, batch)
    after = m.state_dict()
    changed = lambda prefix: any(
        not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix) and before[k].is_floating_point()
    )
    assert changed("G.synthesis") and changed("G.mapping") and changed("D.")
    assert changed("G_ema.synthesis")  # EMA moved towards G
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert int(m.images_seen) == 8 and int(m.iteration) == 1
    # iteration 0 runs the regularisation phases too: pl_mean has moved away from 0
    assert float(m.loss.pl_mean) != 0.0


def test_ema_follows_the_reference_formula():
    m = tiny_module(ema_kimg=0.004)
    with torch.no_grad():
        for p in m.G.parameters():
            p.add_(1.0)
    ema_before = [p.clone() for p in m.G_ema.parameters()]
    m._update_ema(batch_size=8)
    beta = 0.5 ** (8 / 4.0)
    for p_ema, p_old, p in zip(m.G_ema.parameters(), ema_before, m.G.parameters()):
        torch.testing.assert_close(p_ema, p + (p_old - p) * beta)


def test_fingerprint_ignores_evaluation_settings_only(compose_cfg):
    from fidmed.gan.fingerprint import training_fingerprint

    base = training_fingerprint(compose_cfg())
    assert (
        training_fingerprint(
            compose_cfg(
                [
                    "eval.num_gen=9",
                    "extractor=inception_tf",
                    "logger=csv",
                    "schedule.checkpoint_kimg=3",
                    "schedule.eval_kimg=0",
                ]
            )
        )
        == base
    )
    for change in (["seed=1"], ["schedule.kimg=2"], ["model.r1_gamma=1"], ["modality.resolution=64"]):
        assert training_fingerprint(compose_cfg(change)) != base, change


def test_prepared_folder_keeps_its_fingerprint_when_moved(compose_cfg, tmp_path):
    import shutil

    from fidmed.gan.fingerprint import fingerprint_record, training_fingerprint

    a = tmp_path / "data" / "ct"
    a.mkdir(parents=True)
    (a / "manifest.json").write_text('{"preparer": "sliver07", "outputs": ["a.png"]}')
    b = tmp_path / "scratch" / "ct"
    shutil.copytree(a, b)
    at_a = compose_cfg(["modality=ct", f"modality.path={a}"])
    at_b = compose_cfg(["modality=ct", f"modality.path={b}", "modality.cache=disk"])  # a loading setting only
    assert training_fingerprint(at_a) == training_fingerprint(at_b)
    rec = fingerprint_record(at_a)["modality"]
    assert "path" not in rec and len(rec["prepared_manifest_sha256"]) == 64
    # other prepared data (another manifest) is another generator
    (b / "manifest.json").write_text('{"preparer": "sliver07", "outputs": ["a.png", "b.png"]}')
    assert training_fingerprint(at_b) != training_fingerprint(at_a)
    # a folder without fidmed's manifest is identified by its path, as it cannot be recognised elsewhere
    c, d = tmp_path / "mine1", tmp_path / "mine2"
    c.mkdir(), d.mkdir()
    plain_c = compose_cfg(["modality=ct", f"modality.path={c}"])
    assert fingerprint_record(plain_c)["modality"]["path"] == str(c)
    assert training_fingerprint(plain_c) != training_fingerprint(compose_cfg(["modality=ct", f"modality.path={d}"]))


def test_modality_overrides_the_augmentation_and_the_fingerprint_sees_it(compose_cfg):
    from fidmed.augment import build_augmentation
    from fidmed.gan.fingerprint import effective_augmentation, training_fingerprint

    plain = compose_cfg(["augmentation=ada"])
    mri_like = compose_cfg(["augmentation=ada", "+modality.augmentation_overrides.ada.pipeline=bgcfn"])
    assert effective_augmentation(plain).pipeline == "bgcfnc"
    assert effective_augmentation(mri_like).pipeline == "bgcfn"
    assert build_augmentation(effective_augmentation(mri_like)).pipeline == "bgcfn"
    assert training_fingerprint(plain) != training_fingerprint(mri_like)
    # the mri modality's own overrides (ADA bgcfn, DiffAugment color,translation) reach the augmentation
    mri = compose_cfg(["modality=mri", "augmentation=diffaugment"])
    assert build_augmentation(effective_augmentation(mri)).policy == ("color", "translation")
    assert effective_augmentation(compose_cfg(["modality=mri", "augmentation=ada"])).pipeline == "bgcfn"
    # an override the augmentation does not take is one clear error
    typo = compose_cfg(["augmentation=ada", "+modality.augmentation_overrides.ada.pipelin=bgcfn"])
    with pytest.raises(ConfigError, match=r"modality.augmentation_overrides.ada does not fit"):
        effective_augmentation(typo)


# --------------------------------------------------------------------------------------------------------
# Training fingerprints name the folders of trained generators: they must not change.
#: overrides -> fingerprint, computed with Hydra's compose API before the augmentations became registered
#: dataclasses and the config groups typed schemas (the YAML-only configuration of commit 96a0b88).
PINNED_FINGERPRINTS = {
    (): "6a72aff47467f50363727fa5dbaaea74fe0f145ea49f09f4363998630cbcb79f",
    ("experiment=demo",): "33a06eb2c08ea605296337ef0717fcb56b3a5e5cea76e8d4bdd86d8ad2bc4dae",
    ("experiment=smoke",): "4ab25eeee058b48b7204cf967f14937bc6b4dffb978c1b92da9843f7807dc1e5",
    (
        "augmentation=apa",
        "seed=3",
        "schedule.kimg=5",
    ): "7caf6490997d50159369184f3abbfb781c745df61a490b1929fa65b092f80184",
    ("augmentation=ada",): "d9c81a29ab184dba1d5fd7d694746ddff04aca06aa5f8cc972675f5fcc595564",
    ("augmentation=diffaugment",): "2c0985287f716d5d034b4d84add4a61be737c1e82f65f1ea3163585a7c01b573",
    # numbers keep the type they are given (p=1 stays an integer), a policy list stays a list
    (
        "augmentation=ada",
        "augmentation.p=1",
        "augmentation.adaptive=false",
        "+augmentation.strengths.cutout=0",
    ): "434d4df18b1439fee85f278aeb8019727671ea6fe83f13e4f992f8c5c3760a3c",
    (
        "augmentation=diffaugment",
        "augmentation.policy=[color,translation]",
    ): "e86d873c14399d143d0c126968319ff9a7fb9e58f8a99b6ece748b0743241558",
    # the modality's overrides of the augmentation (mri: ADA bgcfn) enter the fingerprint
    (
        "augmentation=ada",
        "+modality.augmentation_overrides.ada.pipeline=bgcfn",
    ): "4ed45fae371a1833b28adca2fa1cb5f3609d156d8c87b6f782f729f923c793b0",
}


@pytest.mark.parametrize("overrides", list(PINNED_FINGERPRINTS), ids=lambda o: " ".join(o) or "default")
def test_fingerprints_of_existing_configurations_do_not_change(overrides):
    from fidmed.config import compose_config
    from fidmed.gan.fingerprint import fingerprint_record, training_fingerprint

    cfg = compose_config(list(overrides))  # paths resolved as run.py resolves them (${hydra:...})
    assert training_fingerprint(cfg) == PINNED_FINGERPRINTS[overrides]
    record = json.dumps(fingerprint_record(cfg), default=str)
    assert "fidmed." not in record and "_target_" not in record  # registry names, never module paths


def test_unknown_augmentation_lists_the_registered_ones():
    from fidmed.augment import build_augmentation

    with pytest.raises(ConfigError, match=r"available: ada, apa, diffaugment, noaug \(augmentation=NAME\)"):
        build_augmentation({"name": "augmix"})


# --------------------------------------------------------------------------------------------------------
# Lightning as intended.
def test_every_backward_pass_goes_through_lightning(one_cpu_thread, monkeypatch):
    """The loss runs its backward passes through manual_backward: Lightning's hooks (precision plugin, strategy)
    see each one."""
    seen = {"lightning": 0, "tensor": 0}

    class Count(L.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            seen["lightning"] += 1

    backward = torch.Tensor.backward

    def counting_backward(self, *args, **kwargs):
        seen["tensor"] += 1
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    fit_one_step(tiny_module(), torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), [Count()])
    # iteration 0, 2 chunks of 4: G main 2, G reg 2, D main 2 x (fakes + reals), D reg 2
    assert seen["tensor"] == 10 and seen["lightning"] == 10


def test_last_ckpt_rebuilds_the_module_from_its_hyperparameters(compose_cfg, one_cpu_thread):
    from fidmed.augment.ada import ADA
    from fidmed.data.datamodule import build_dataset
    from fidmed.gan.train import train_or_reuse
    from fidmed.tracking import Tracker

    cfg = compose_cfg(
        SMOKE
        + [
            "augmentation=ada",
            "augmentation.p=0.25",
            "augmentation.adaptive=false",
            "+modality.augmentation_overrides.ada.pipeline=bgc",
        ]
    )
    final = train_or_reuse(cfg, build_dataset(cfg.modality), Tracker())
    last = final.parent / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)  # plain values: nothing to execute
    assert saved["hyper_parameters"]["augmentation"]["pipeline"] == "bgc"  # the modality's override, as trained
    module = StyleGAN2Module.load_from_checkpoint(last)
    assert isinstance(module.augment, ADA) and module.augment.pipeline == "bgc"
    assert module.augment.probability == 0.25 and not module.augment.adaptive
    assert module.net_kwargs == torch.load(final, weights_only=True)["network_kwargs"]
    state = module.state_dict()
    assert set(state) == set(saved["state_dict"])
    for key, value in saved["state_dict"].items():
        assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value, key
    assert int(module.images_seen) == 32 and module.random_stream.state is not None


def test_ddp_ranks_draw_from_their_own_streams():
    """Rank r of w draws from seed * w + r (stylegan2-ada-pytorch's seeding); one process continues the generators
    seeded with the seed, as before (seed * 1 + 0)."""
    draws = []
    for rank in range(2):
        m = tiny_module(seed=3)
        m._start_random_stream(rank, 2)
        with m.random_stream.active("cpu"):
            draws.append(torch.randn(4))
        assert torch.equal(draws[-1], torch.randn(4, generator=torch.Generator().manual_seed(3 * 2 + rank)))
    assert not torch.equal(draws[0], draws[1])
    single = tiny_module(seed=3)
    single._start_random_stream(0, 1)
    assert single.random_stream.state is None  # continues the global generators (bitwise the runs before)


# --------------------------------------------------------------------------------------------------------
# Checks before any work: one line that names the fix, nothing left behind.
def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_gpu_trainer_without_a_gpu_stops_before_any_work(compose_cfg, monkeypatch):
    from fidmed.data.datamodule import build_dataset
    from fidmed.gan.train import train_or_reuse
    from fidmed.tracking import Tracker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = compose_cfg(SMOKE + ["trainer=gpu"])
    with pytest.raises(FidmedError) as info:
        train_or_reuse(cfg, build_dataset(cfg.modality), Tracker())
    assert "no CUDA device is visible" in _one_line(info.value) and "trainer=cpu" in str(info.value)
    assert not Path(cfg.paths.train_root).exists()
    # more devices than are visible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_cfg(SMOKE + ["trainer=ddp", "trainer.devices=2"])
    with pytest.raises(FidmedError, match=r"trainer.devices=2 but only 1 CUDA device\(s\) are visible"):
        train_or_reuse(cfg, build_dataset(cfg.modality), Tracker())
    assert not Path(cfg.paths.train_root).exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder in which nothing can be created (root ignores permissions: then a read-only file system)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() != 0:
            yield folder
            return
        probe = Path("/sys/fidmed-write-test")  # sysfs refuses new entries, even to root
        try:
            probe.mkdir()
        except OSError:
            yield Path("/sys")
            return
        probe.rmdir()
        pytest.skip("no read-only folder available to this user")
    finally:
        folder.chmod(0o755)


def test_read_only_training_folder_stops_before_any_work(compose_cfg, read_only_folder):
    from fidmed.data.datamodule import build_dataset
    from fidmed.gan.train import train_or_reuse
    from fidmed.tracking import Tracker

    cfg = compose_cfg(SMOKE)
    with open_dict(cfg):
        cfg.paths.train_root = str(read_only_folder / "train")
    before = sorted(read_only_folder.iterdir())
    with pytest.raises(FidmedError) as info:
        train_or_reuse(cfg, build_dataset(cfg.modality), Tracker())
    message = _one_line(info.value)
    assert "the training folder" in message and "cannot be written" in message
    assert str(read_only_folder / "train") in message
    assert "paths.train_root=" in message
    assert sorted(read_only_folder.iterdir()) == before
