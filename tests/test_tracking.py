"""Experiment tracking (fidmed.tracking) through the Lightning loggers' public API."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from fidmed.tracking import CSVTracker, Tracker, build_tracker, image_grid


def test_wandb_tracker_logs_images_and_tables_through_the_loggers_api(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    calls = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, **kw: calls.append(("image", kw)))
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, **kw: calls.append(("table", kw)))
    tracker = build_tracker(OmegaConf.create({"name": "wandb", "mode": "offline"}), tmp_path, {}, "job")
    grid = np.zeros((8, 8), dtype=np.uint8)
    tracker.log_images("samples", grid, step=3, caption="G_ema")
    tracker.log_table("results", [{"metric": "fd", "value": 1.5}, {"metric": "rfd", "extra": 2}])
    tracker.log_table("empty", [])
    assert calls[0] == ("image", {"key": "samples", "images": [grid], "step": 3, "caption": ["G_ema"]})
    assert calls[1] == (
        "table",
        {"key": "results", "columns": ["metric", "value", "extra"], "data": [["fd", 1.5, None], ["rfd", None, 2]]},
    )
    assert len(calls) == 2


def test_offline_wandb_run_holds_the_images_and_the_table_and_is_finished(tmp_path):
    pytest.importorskip("wandb")
    tracker = build_tracker(
        OmegaConf.create({"name": "wandb", "mode": "offline", "project": "fidmed-test"}), tmp_path, {"seed": 0}, "job"
    )
    tracker.summary({"fidmed/job": "job"})
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    tracker.log_images("samples", image_grid(images), caption="seeds 0-3")
    tracker.log_table("results", [{"metric": "fd", "value": 1.5}])
    tracker.log_metrics({"fd/x": 1.0}, step=1)
    tracker.finish(0)
    tracker.finish(0)  # idempotent
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("files/media/images/samples_*.png"))
    assert list(run.glob("files/media/table/results_*.table.json"))
    debug = (run / "logs" / "debug.log").read_text()
    assert "finishing run" in debug and "got exitcode: 0" in debug


def test_other_trackers(tmp_path):
    assert type(build_tracker(None, tmp_path, {}, "job")) is Tracker
    csv = build_tracker(OmegaConf.create({"name": "csv"}), tmp_path, {}, "job")
    assert isinstance(csv, CSVTracker)
    csv.log_metrics({"fd/x": 1.0}, step=0)
    csv.finish(0)
    assert (tmp_path / "csv" / "metrics.csv").read_text().startswith("fd/x")
    grid = image_grid(np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2), columns=2)
    assert grid.shape == (2, 4, 3)


def _online_cfg(timeout: float = 5.0):
    from omegaconf import OmegaConf

    from fidmed.config import WandbLogger

    return OmegaConf.structured(WandbLogger(mode="online", init_timeout=timeout, group="g"))


@pytest.mark.parametrize("case", ["no_api_key", "server_unreachable"])
def test_wandb_online_without_network_falls_back_to_offline_in_bounded_time(tmp_path, monkeypatch, caplog, case):
    """logger.mode=online without credentials or a reachable server: a traceback after 7-97 s before; now a
    warning naming `wandb sync`, an offline run, and the job goes on."""
    import logging
    import time

    from fidmed.tracking import build_tracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    if case == "server_unreachable":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = build_tracker(_online_cfg(5.0), tmp_path / "run", {"a": 1}, "job")
        tracker.log_metrics({"fd/x": 1.0}, step=0)
        tracker.summary({"fd/x": 1.0})
        tracker.finish(0)
    assert time.monotonic() - started < 60
    assert tracker.mode == "offline" and "wandb sync" in caplog.text
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
