"""The LightningModule: one real training step, optimiser scaling, EMA, fingerprint, resume."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from fidmed.gan.module import StyleGAN2Module, training_phases

TINY = dict(name="tiny", z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16, num_fp16_res=0,
            conv_clamp=None, mbstd_group=4, batch_size=8, batch_chunk=4, lr_g=0.002, lr_d=0.002, betas=[0.0, 0.99],
            eps=1e-8, ema_kimg=0.01, ema_rampup=None, style_mixing_prob=0.9, r1_gamma=1.0, pl_weight=2.0,
            pl_batch_shrink=2, pl_decay=0.01, g_reg_interval=4, d_reg_interval=16)


def tiny_module(**over) -> StyleGAN2Module:
    torch.manual_seed(0)
    return StyleGAN2Module(OmegaConf.create({**TINY, **over}), resolution=16, channels=1, kimg=1.0)


def test_phases_follow_the_reference():
    names = [(p.name, p.interval) for p in training_phases(4, 16)]
    assert names == [("Gmain", 1), ("Greg", 4), ("Dmain", 1), ("Dreg", 16)]
    assert [(p.name, p.interval) for p in training_phases(None, None)] == [("Gboth", 1), ("Dboth", 1)]


def test_lazy_regularisation_scales_the_optimisers():
    opt_g, opt_d = tiny_module().configure_optimizers()
    rg, rd = 4 / 5, 16 / 17
    assert opt_g.defaults["lr"] == pytest.approx(0.002 * rg)
    assert opt_g.defaults["betas"] == pytest.approx((0.0, 0.99 ** rg))
    assert opt_d.defaults["lr"] == pytest.approx(0.002 * rd)
    assert opt_d.defaults["betas"] == pytest.approx((0.0, 0.99 ** rd))


class _FakeTrainer:
    """Just enough of a Trainer for calling training_step outside fit()."""
    world_size = 1
    should_stop = False
    loggers: list = []


def _manual_step(module: StyleGAN2Module, batch: torch.Tensor):
    opts = module.configure_optimizers()
    module.optimizers = lambda: opts  # what Lightning provides inside fit()
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    module._trainer = _FakeTrainer()
    module.training_step(batch, 0)
    return opts


def test_one_training_step_changes_g_d_and_ema_and_counts_images():
    m = tiny_module()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batch = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    _manual_step(m, batch)
    after = m.state_dict()
    changed = lambda prefix: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)
                                 and before[k].is_floating_point())
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
    from fidmed.gan.train import training_fingerprint

    base = training_fingerprint(compose_cfg())
    assert training_fingerprint(compose_cfg(["eval.num_gen=9", "extractor=inception_tf", "logger=csv",
                                             "schedule.checkpoint_kimg=3", "schedule.eval_kimg=0"])) == base
    for change in (["seed=1"], ["schedule.kimg=2"], ["model.r1_gamma=1"], ["modality.resolution=64"]):
        assert training_fingerprint(compose_cfg(change)) != base, change


def test_prepared_folder_keeps_its_fingerprint_when_moved(compose_cfg, tmp_path):
    import shutil

    from fidmed.gan.train import fingerprint_record, training_fingerprint

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
    from fidmed.gan.train import effective_augmentation, training_fingerprint

    plain = compose_cfg(["augmentation=ada"])
    mri_like = compose_cfg(["augmentation=ada", "+modality.augmentation_overrides.ada.pipeline=bgcfn"])
    assert effective_augmentation(plain).pipeline == "bgcfnc"
    assert effective_augmentation(mri_like).pipeline == "bgcfn"
    assert build_augmentation(effective_augmentation(mri_like)).pipeline == "bgcfn"
    assert training_fingerprint(plain) != training_fingerprint(mri_like)
