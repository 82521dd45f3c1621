"""Experiment tracking behind one small interface: W&B (offline by default), CSV, or nothing.

The Lightning trainer gets ``tracker.lightning_logger``; evaluation code logs through the tracker's methods so
that it works the same with and without a trainer. Everything goes through the Lightning logger's public API
(``log_metrics``, ``log_image``, ``log_table``, ``experiment``). ``finish()`` always runs (the job wrapper calls it
in a ``finally``), so a failed job closes its W&B run and the next job of a multirun starts its own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Tracker:
    """No-op base (``logger=none``)."""

    name = "none"
    lightning_logger: Any = False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_images(self, key: str, grid: np.ndarray, step: int | None = None, caption: str = "") -> None:
        pass

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class CSVTracker(Tracker):
    name = "csv"

    def __init__(self, run_dir: Path) -> None:
        from lightning.pytorch.loggers import CSVLogger

        self.lightning_logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.lightning_logger.log_metrics(metrics, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.lightning_logger.finalize("success" if exit_code == 0 else "failed")
        self.lightning_logger.save()


class WandbTracker(Tracker):
    """W&B through Lightning's ``WandbLogger``. ``mode=online`` waits at most ``logger.init_timeout`` seconds for
    the server; without credentials or a reachable server the run continues offline with a warning naming
    ``wandb sync``, so training and results never depend on the network."""

    name = "wandb"

    def __init__(self, cfg: Any, run_dir: Path, config: dict[str, Any], run_name: str) -> None:
        mode = str(cfg.get("mode", "offline"))
        if mode not in ("offline", "online", "disabled"):
            from fidmed.errors import ConfigError

            raise ConfigError(f"logger.mode={mode!r}; use offline (default), online (after `wandb login`) or disabled.")
        os.environ.setdefault("WANDB_SILENT", "true")
        self._args = dict(
            save_dir=str(run_dir),
            project=cfg.get("project", "fidmed"),
            entity=cfg.get("entity"),
            group=cfg.get("group"),
            tags=list(cfg.get("tags") or []),
            name=run_name,
            config=config,
            log_model=False,
        )
        self._finished = False
        self.mode = mode
        if mode == "online":
            self.lightning_logger = self._start_online(float(cfg.get("init_timeout", 30.0)), Path(run_dir))
        else:
            self.lightning_logger = self._logger(mode)

    def _logger(self, mode: str, **kwargs: Any) -> Any:
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(**self._args, mode=mode, offline=(mode == "offline"), **kwargs)

    def _start_online(self, timeout: float, run_dir: Path) -> Any:
        """An online run started now (bounded by ``timeout``), or an offline one when that is not possible."""
        import wandb

        try:
            if not wandb.login(prompt=False, verify=False):
                raise RuntimeError("no W&B API key on this machine (`wandb login` or WANDB_API_KEY)")
            logger = self._logger("online", settings=wandb.Settings(init_timeout=timeout))
            logger.experiment  # noqa: B018 -- start the run now, while a fallback is still possible
            return logger
        except Exception as exc:  # noqa: BLE001 -- any failure to go online falls back to offline
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning(
                "W&B online is not available (%s); logging offline to %s instead. Upload the run later "
                "with `wandb sync %s/wandb/offline-run-*`.",
                reason,
                run_dir / "wandb",
                run_dir,
            )
            try:
                wandb.finish(exit_code=1)
            except Exception:  # noqa: BLE001 -- nothing was started
                pass
            self.mode = "offline"
            return self._logger("offline")

    @property
    def run(self):
        return self.lightning_logger.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.lightning_logger.log_metrics(metrics, step=step)

    def log_images(self, key: str, grid: np.ndarray, step: int | None = None, caption: str = "") -> None:
        self.lightning_logger.log_image(key=key, images=[grid], step=step, caption=[caption])

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        self.lightning_logger.log_table(key=key, columns=columns, data=[[row.get(c) for c in columns] for row in rows])

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        """Finish the job's run with ``exit_code`` (every job has a run: one never started is started and finished
        here, so a sweep sees every trial). A run that cannot even be started is reported, not raised: the job's own
        error, if any, is the one to see."""
        if self._finished:
            return
        self._finished = True
        try:
            run = self.run
        except Exception as exc:  # noqa: BLE001 -- W&B could not start; the job already failed or reports it
            log.warning("could not finish the W&B run: %s", exc)
            return
        run.finish(exit_code=exit_code)


def build_tracker(logger_cfg: Any, run_dir: str | os.PathLike, config: dict[str, Any], run_name: str) -> Tracker:
    name = logger_cfg.get("name", "none") if logger_cfg is not None else "none"
    run_dir = Path(run_dir)
    if name == "wandb":
        return WandbTracker(logger_cfg, run_dir, config, run_name)
    if name == "csv":
        return CSVTracker(run_dir)
    if name == "none":
        return Tracker()
    from fidmed.errors import ConfigError

    raise ConfigError(f"unknown logger {name!r}; use logger=wandb, logger=csv or logger=none.")


def image_grid(images_uint8: np.ndarray, columns: int | None = None) -> np.ndarray:
    """NCHW uint8 -> one HWC uint8 grid (gray stays 1 channel)."""
    n, c, h, w = images_uint8.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images_uint8[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def log_audit_grids(tracker: Tracker, records: Any) -> None:
    """The memorisation audit's closest pairs (generated left, nearest training image right) as W&B images, one
    per feature space, and the audit summary as a table."""
    rows = []
    for r in records:
        if r.metric != "copies":
            continue
        grid = r.arrays.get("grid")
        if grid is not None:
            pairs = r.details.get("closest") or []
            tracker.log_images(
                f"audit/{r.label}",
                grid,
                caption=f"{r.label}: the {len(pairs)} generated images closest to a training image (left) and that "
                f"training image (right); lowest ratio {pairs[0]['ratio']:.3g}"
                if pairs
                else r.label,
            )
        rows.append(
            {
                "space": r.label,
                "copies": r.value,
                "n_flagged": r.details.get("n_flagged"),
                "ratio_median": r.details.get("ratio_median"),
                "grid": r.details.get("grid"),
            }
        )
    if rows:
        tracker.log_table("audit", rows)
