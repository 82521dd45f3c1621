"""What an evaluation metric is: one registered function that declares what it needs and which numbers it makes.

A metric is registered once, next to its mathematics::

    @register_metric("kid", columns={"kid": "KID"}, needs_gen_features=True, needs_real_features=True,
                     config=KIDConfig, summary="Kernel Inception Distance ...")
    def kid_metric(inputs: MetricInputs) -> list[MetricValue]: ...

The evaluator keeps the raw features a selected metric declares it needs (besides the float64 moments every
metric gets), calls each selected metric once per extractor, and records every :class:`MetricValue` with the
extractor's protocol. The results table, ``fidmed evaluate --metrics`` help and the ``eval`` config (one
``eval.<metric>`` options node per metric that has a ``config`` dataclass, e.g. ``eval.prdc.k``) read the same
registry. ``requires`` names metrics whose values this one reads from ``inputs.results`` (rfd reads fd); the
evaluator computes those first and selects them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fidmed.registry import Entry, new_registry


@dataclass(frozen=True)
class MetricInfo:
    """A metric's facts: the numbers it makes (name -> short table heading), what it needs, one line of help."""

    columns: dict[str, str]
    needs_gen_features: bool = False
    needs_real_features: bool = False
    requires: tuple[str, ...] = ()
    summary: str = ""


@dataclass
class MetricValue:
    """One number a metric made, with what a reader needs to interpret it (``details``) and the protocol entries
    that belong to this metric only (``protocol``, e.g. ``knn_k``)."""

    name: str
    value: float
    details: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricInputs:
    """Everything a metric may use for one extractor: float64 moments of the generated set, of the whole real set
    and of its two seeded halves, the raw features where some selected metric asked for them (in source-index
    order), the device, the metric seed, this metric's options and the values computed before it."""

    gen: Any  # StreamingMoments
    real: Any  # StreamingMoments of the whole real set
    real_halves: tuple[Any, Any]  # StreamingMoments of the seeded halves (relative FD)
    device: torch.device
    seed: int
    options: Any = None  # the metric's config dataclass instance (None when it has none)
    results: dict[str, MetricValue] = field(default_factory=dict)
    gen_features_fn: Callable[[], np.ndarray] | None = None
    real_features_fn: Callable[[], np.ndarray] | None = None

    @property
    def gen_features(self) -> np.ndarray:
        if self.gen_features_fn is None:
            raise RuntimeError("generated features were not kept: declare needs_gen_features=True")
        return self.gen_features_fn()

    @property
    def real_features(self) -> np.ndarray:
        if self.real_features_fn is None:
            raise RuntimeError("real features were not kept: declare needs_real_features=True")
        return self.real_features_fn()


MetricFn = Callable[[MetricInputs], list[MetricValue]]

METRICS = new_registry("metric", ("fidmed.metrics",), hint="eval.metrics=[fd,rfd,prdc] or --metrics fd rfd prdc")


def register_metric(
    name: str,
    *,
    columns: dict[str, str],
    needs_gen_features: bool = False,
    needs_real_features: bool = False,
    requires: tuple[str, ...] = (),
    config: type | None = None,
    summary: str = "",
) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(inputs) -> [MetricValue, ...]`` as the metric ``name`` (see the module docstring)."""
    info = MetricInfo(dict(columns), needs_gen_features, needs_real_features, tuple(requires), summary)
    return METRICS.register(name, info=info, config=config)


def metric_entry(name: str) -> Entry[MetricFn]:
    return METRICS.get(name)


def resolve_metrics(names: list[str] | tuple[str, ...]) -> list[str]:
    """The selected metrics in evaluation order: each after the metrics it requires (added when missing), fd
    always (every FD-based record builds on it), duplicates dropped. Unknown names raise a ConfigError."""
    order: list[str] = []

    def visit(name: str) -> None:
        entry = METRICS.get(name)
        for req in entry.info.requires:
            visit(req)
        if name not in order:
            order.append(name)

    for name in ["fd", *[str(n).lower() for n in names]]:
        visit(name)
    return order


def metric_columns() -> dict[str, str]:
    """Every registered metric's numbers: name -> short table heading, in registry order."""
    out: dict[str, str] = {}
    for entry in METRICS.entries():
        out.update(entry.info.columns)
    return out
