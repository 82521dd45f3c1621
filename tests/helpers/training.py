"""A real Lightning trainer for unit tests: one CPU process, nothing written (no logger, checkpoint or bar)."""

from __future__ import annotations

from typing import Any


def cpu_trainer(max_steps: int, **kwargs: Any) -> Any:
    """``lightning.Trainer`` that runs ``max_steps`` steps on the CPU and writes nothing; ``kwargs`` add to it."""
    import lightning

    return lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
