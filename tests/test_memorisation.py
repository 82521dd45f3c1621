"""The memorisation audit (fidmed.metrics.memorisation): planted exact and lightly perturbed copies of training
images are flagged in feature and pixel space and a clean set is not; C_T detects copying; every image is read once;
and the audit (with the bootstrap) runs through `fidmed evaluate`, run.py's job, results.json and `fidmed collect`."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from test_evaluator import ToyExtractor

from fidmed.data.phantom import render_phantoms
from fidmed.errors import ConfigError, FidmedError
from fidmed.evaluation.evaluator import Evaluator
from fidmed.evaluation.results import format_results_table, write_audit_files, write_results_json
from fidmed.evaluation.sources import DatasetSource
from fidmed.metrics.memorisation import (
    AuditSettings,
    audit_settings,
    data_copying_ct,
    kmeans,
    mann_whitney_z,
    pairs_grid,
)


class Images(torch.utils.data.Dataset):
    """Given uint8 NCHW images as a dataset (with a manifest hash, so real statistics are cached)."""

    def __init__(self, images: np.ndarray, name: str) -> None:
        self.images, self.name = images, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i].copy())

    def manifest_hash(self) -> str:
        return hashlib.sha256(self.images.tobytes()).hexdigest()


class Counting:
    """An image source that counts the images it hands out (no image may be read twice by an evaluation)."""

    def __init__(self, source) -> None:
        self.source, self.read = source, 0

    @property
    def description(self):
        return self.source.description

    def __len__(self):
        return len(self.source)

    def batches(self, batch_size, indices=None):
        for idx, images in self.source.batches(batch_size, indices):
            self.read += len(idx)
            yield idx, images


@pytest.fixture(scope="module")
def planted():
    """240 training phantoms; 200 new ones; 8 exact and 8 noisy (sigma 4 grey levels) copies of training images."""
    train = render_phantoms(240, 32, seed=0)
    new = render_phantoms(200, 32, seed=1)
    rng = np.random.default_rng(0)
    src = rng.choice(len(train), 16, replace=False)
    noise = rng.normal(0.0, 4.0, train[src[8:]].shape).round()
    noisy = np.clip(train[src[8:]].astype(np.int64) + noise, 0, 255).astype(np.uint8)
    gen = np.concatenate([new, train[src[:8]], noisy])
    order = rng.permutation(len(gen))  # planted copies anywhere among the generated images
    return train, new, gen[order], np.argsort(order)[200:], src


def _evaluator(train, tmp_path, **audit):
    return Evaluator(
        [ToyExtractor("toy", 64, 1)],
        DatasetSource(Images(train, "train")),
        cache_dir=tmp_path,
        batch_size=32,
        device="cpu",
        audit={"enabled": True, **audit},
    )


def test_audit_flags_planted_copies_and_not_a_clean_set(planted, tmp_path):
    train, new, gen, where, src = planted
    ev = _evaluator(train, tmp_path)
    real_source = ev.real
    ev.real = Counting(real_source)
    gen_source = Counting(DatasetSource(Images(gen, "gen")))
    records = ev.evaluate(gen_source)
    by = {(r.extractor, r.metric): r for r in records}
    assert {r.extractor for r in records} == {"toy", "pixels"}
    for space in ("toy", "pixels"):
        res = by[(space, "copies")].arrays["audit"]
        assert np.array_equal(np.flatnonzero(res.flagged), np.sort(where)), space  # every copy, nothing else
        assert np.array_equal(res.nn_index[where], src), space  # each copy's nearest training image is its source
        assert np.all(res.ratio[where[:8]] == 0) and np.all(res.ratio[where[8:]] < 0.5)
        assert by[(space, "copies")].value == pytest.approx(16 / 216)
        assert by[(space, "authenticity")].value <= 200 / 216  # a copy is never authentic
        assert math.isnan(by[(space, "ct")].value) and "held-out" in by[(space, "ct")].details["reason"]
        closest = by[(space, "copies")].details["closest"]
        assert len(closest) == 16 and {p["gen_index"] for p in closest} == set(where.tolist())
        grid = by[(space, "copies")].arrays["grid"]
        assert grid.shape == (4 * 36, 4 * (2 * 32 + 2 + 6))  # 16 pairs, 4 per row, gaps of 2 and 6 pixels
        assert np.array_equal(grid[2:34, 2:34], grid[2:34, 36:68])  # the closest pair: an exact copy, side by side
    from fidmed.evaluation.results import format_results_table

    table = format_results_table(records)
    assert "Memorisation audit" in table and "n/a (no held-out real split" in table and "nan" not in table
    # one pass: every image read once, plus the 16 pairs of each space's grid (2 spaces) by index, and the first
    # image for the shape check that precedes any forward pass
    assert (gen_source.read, ev.real.read) == (len(gen) + 2 * 16 + 1, len(train) + 2 * 16 + 1)
    # a clean set: nothing flagged
    ev.real = real_source
    clean = {(r.extractor, r.metric): r for r in ev.evaluate(DatasetSource(Images(new, "new")))}
    for space in ("toy", "pixels"):
        assert clean[(space, "copies")].value == 0.0
        assert 0.3 < clean[(space, "authenticity")].value < 0.8  # about half, as for new samples of the distribution


def test_audit_files_results_json_and_table(planted, tmp_path):
    train, new, gen, where, src = planted
    records = _evaluator(train, tmp_path / "cache", pairs=4).evaluate(DatasetSource(Images(gen, "gen")))
    files = write_audit_files(tmp_path / "run", records)
    assert sorted(f.name for f in files) == ["pixels.csv", "pixels_closest.png", "toy.csv", "toy_closest.png"]
    with open(tmp_path / "run" / "audit" / "toy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(gen) and sum(r["flagged"] == "True" for r in rows) == 16
    assert int(rows[where[0]]["nn_train_index"]) == src[0] and float(rows[where[0]]["ratio"]) == 0.0
    assert Image.open(tmp_path / "run" / "audit" / "toy_closest.png").size == (
        4 * (2 * 32 + 2 + 6),
        36,
    )  # 4 pairs, 1 row
    payload = json.loads(write_results_json(tmp_path / "run" / "results.json", records, {}).read_text())
    copies = next(r for r in payload["results"] if r["metric"] == "copies" and r["extractor"] == "pixels")
    assert copies["details"]["grid"].endswith("pixels_closest.png") and copies["details"]["n_flagged"] == 16
    assert copies["protocol"]["audit"]["threshold"] == 0.5 and copies["protocol"]["audit"]["space"] == "pixels"
    assert copies["protocol"]["input_size"] == 32 and copies["protocol"]["resizer"] == "area-average"
    text = format_results_table(records)
    assert "Memorisation audit" in text and "16 / 216 (ratio < 0.5)" in text


def test_ct_detects_copying_and_underfitting_and_not_new_samples():
    rng = np.random.default_rng(5)
    train = rng.standard_normal((600, 6))
    heldout = rng.standard_normal((300, 6))
    dev = torch.device("cpu")
    new, _ = data_copying_ct(train, heldout, rng.standard_normal((300, 6)), 3, 20, 0, dev)
    copied, details = data_copying_ct(train, heldout, train[:300] + 0.01 * rng.standard_normal((300, 6)), 3, 20, 0, dev)
    wide, _ = data_copying_ct(train, heldout, 2.0 * rng.standard_normal((300, 6)), 3, 20, 0, dev)
    assert abs(new) < 3 and copied < -10 and wide > 3
    assert details["cells_used"] == 3 and sum(c["n_heldout"] for c in details["cells"]) == 300
    few, why = data_copying_ct(train, heldout, rng.standard_normal((30, 6)), 3, 20, 0, dev)
    assert math.isnan(few) and "more than 20" in why["reason"]


def test_mann_whitney_z_is_scipys_u_z_scored_with_the_reference_correction():
    rng = np.random.default_rng(6)
    gen, held = rng.random(40), np.concatenate([rng.random(29), [0.5]])
    gen[3] = 0.5  # a tie: counts one half
    u = stats.mannwhitneyu(gen, held).statistic
    want = (u - (40 * 30 / 2 - 0.5)) / math.sqrt(40 * 30 * 71 / 12)
    assert mann_whitney_z(gen, held) == pytest.approx(want, rel=1e-12)


def test_kmeans_is_seeded_and_finds_separated_clusters():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(c, 0.1, (50, 2)) for c in (0.0, 5.0, 10.0)])
    c1, c2 = kmeans(x, 3, seed=1), kmeans(x, 3, seed=1)
    assert np.array_equal(c1, c2)
    assert np.allclose(np.sort(c1[:, 0]), [0, 5, 10], atol=0.1)


def test_pairs_grid_layout():
    gen = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    grid = pairs_grid(gen, 255 - gen, per_row=1, gap=1)
    assert grid.shape == (2 * (4 + 2), 2 * 5 + 1 + 3, 3)
    assert np.array_equal(grid[1:5, 1:6], gen[0].transpose(1, 2, 0))
    assert np.array_equal(grid[7:11, 7:12], (255 - gen[1]).transpose(1, 2, 0))


def test_audit_settings_are_checked():
    assert audit_settings({"enabled": False}) is None
    assert audit_settings({"enabled": True}) == AuditSettings()
    for bad, word in (({"threshold": 0}, "threshold"), ({"pixel_size": -1}, "pixel_size"), ({"cells": 0}, "cells")):
        with pytest.raises(ConfigError, match=word):
            audit_settings({"enabled": True, **bad})


def test_heldout_checks(planted, tmp_path):
    train, new, *_ = planted
    with pytest.raises(FidmedError, match="eval.audit.enabled"):
        Evaluator(
            [ToyExtractor("toy", 8, 1)], DatasetSource(Images(train, "t")), heldout=DatasetSource(Images(new, "n"))
        )
    same = _evaluator(train, tmp_path)
    same.heldout = DatasetSource(Images(train, "t"))
    with pytest.raises(FidmedError, match="training set itself"):
        same.evaluate(DatasetSource(Images(new[:20], "g")))
    small = _evaluator(train, tmp_path)
    small.heldout = DatasetSource(Images(render_phantoms(5, 16, seed=3), "h"))
    with pytest.raises(FidmedError, match="prepare the held-out split"):
        small.evaluate(DatasetSource(Images(new[:20], "g")))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def mean_colour():
    from test_extension_points import MeanColour

    from fidmed.features.registry import EXTRACTORS, ExtractorInfo

    EXTRACTORS.add(
        "mean_colour",
        MeanColour,
        info=ExtractorInfo(
            study_name="MeanColour",
            feature_dim=6,
            input_size=16,
            resizer="clean",
            weights=None,
            network="per-channel mean/std",
            description="test-only",
        ),
    )
    yield
    EXTRACTORS.remove("mean_colour")


def _png_folder(path, images):
    path.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(path / f"{i:03d}.png")
    return path


def test_fidmed_evaluate_audit_and_uncertainty_then_collect(mean_colour, planted, tmp_path, capsys):
    from fidmed.analysis.collect import collect
    from fidmed.cli import main

    train, new, gen, where, src = planted
    real = _png_folder(tmp_path / "real", train[:120])
    heldout = _png_folder(tmp_path / "heldout", new[100:200])
    gen_dir = _png_folder(tmp_path / "gen", np.concatenate([new[:60], train[:4]]))
    out = tmp_path / "eval" / "results.json"
    base = ["evaluate", str(gen_dir), str(real), "--extractor", "mean_colour", "--metrics", "fd", "rfd", "prdc"]
    base += ["--set", "prdc.k=3", "--weights", "random", "--device", "cpu", "--out", str(out)]
    trust = ["--uncertainty", "20", "--audit-memorisation", "--heldout", str(heldout), "--set", "audit.min_cell=5"]
    assert main(base + trust) == 0
    text = capsys.readouterr().out
    assert "How far each number can move" in text and "Memorisation audit" in text
    records = json.loads(out.read_text())["results"]
    fd = next(r for r in records if r["metric"] == "fd")
    assert fd["details"]["uncertainty"]["replicates"] == 20 and fd["details"]["uncertainty"]["ci_high"] is not None
    copies = {r["extractor"]: r for r in records if r["metric"] == "copies"}
    assert set(copies) == {"mean_colour", "pixels"}
    assert copies["pixels"]["details"]["n_flagged"] >= 4  # the 4 exact copies at least
    assert (tmp_path / "eval" / "audit" / "pixels_closest.png").is_file()
    ct = {r["extractor"]: r for r in records if r["metric"] == "ct"}
    assert ct["pixels"]["protocol"]["audit"]["n_heldout"] == 100 and ct["pixels"]["details"]["n_heldout"] == 100
    rows = collect([out]).rows
    fd_row = next(r for r in rows if r["metric"] == "fd")
    assert fd_row["se"] > 0 and fd_row["n_replicates"] == 20 and len(fd_row["replicates"].split()) == 20
    assert fd_row["resampled"] == "generated real" and fd_row["real_resample_key"]
    assert next(r for r in rows if r["metric"] == "copies" and r["extractor"] == "pixels")["grid"].endswith(".png")
    assert main(base + ["--heldout", str(heldout)]) == 2  # without the audit: one line naming the fix
    assert "add --audit-memorisation" in capsys.readouterr().err


def test_run_py_job_with_uncertainty_and_audit(mean_colour, tmp_path):  # ~25 s: a tiny generator, then both
    from fidmed.config import compose_config
    from fidmed.job import run_job

    cfg = compose_config(
        [
            "experiment=smoke",
            "extractor=[mean_colour]",
            "eval.metrics=[fd,rfd,prdc,kid]",
            "eval.prdc.k=3",
            "eval.kid.subset_size=20",
            "eval.uncertainty.replicates=20",
            "eval.audit.enabled=true",
            f"paths.root={tmp_path}",
            "schedule.kimg=0.016",
            "schedule.checkpoint_kimg=0.016",
        ]
    )
    payload = run_job(cfg, tmp_path / "run")
    unc = [
        r["details"].get("uncertainty")
        for r in payload["results"]
        if r["metric"] not in ("authenticity", "copies", "ct")
    ]
    assert unc and all(u and u["replicates"] == 20 for u in unc)
    assert (tmp_path / "run" / "audit" / "mean_colour.csv").is_file()
    assert (tmp_path / "run" / "audit" / "pixels_closest.png").is_file()
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    grids = [r["details"]["grid"] for r in on_disk if r["metric"] == "copies"]
    assert sorted(grids) == sorted(
        str(tmp_path / "run" / "audit" / f"{s}_closest.png") for s in ("mean_colour", "pixels")
    )


def test_wandb_gets_the_grids_and_the_intervals(planted, tmp_path):
    from fidmed.evaluation.results import summary_values
    from fidmed.metrics.uncertainty import plan_from
    from fidmed.tracking import Tracker, log_audit_grids

    class Recorder(Tracker):
        def __init__(self):
            self.images, self.tables = [], []

        def log_images(self, key, grid, step=None, caption=""):
            self.images.append((key, grid.shape, caption))

        def log_table(self, key, rows):
            self.tables.append((key, rows))

    train, new, gen, where, src = planted
    ev = _evaluator(train, tmp_path, pairs=4)
    ev.uncertainty = plan_from({"replicates": 10})
    records = ev.evaluate(DatasetSource(Images(gen[:60], "gen")))
    tracker = Recorder()
    log_audit_grids(tracker, records)
    assert [k for k, *_ in tracker.images] == ["audit/toy [RANDOM-INIT]", "audit/pixels"]
    assert "closest to a training image" in tracker.images[0][2]
    assert tracker.tables[0][0] == "audit" and len(tracker.tables[0][1]) == 2
    summary = summary_values(records)
    assert {"fd/toy [RANDOM-INIT]", "fd_se/toy [RANDOM-INIT]", "copies/pixels"} <= set(summary)
