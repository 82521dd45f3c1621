"""Evaluation results: one record per (extractor, metric), each with the protocol that made it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fidmed.atomic import atomic_write

RANDOM_BANNER = "RANDOM-INIT"
#: details shown next to a metric's column in the table: metric -> {heading: details key}
DETAIL_COLUMNS = {"fd": {"route": "route"}, "rfd": {"FD real split": "fd_real_split"}}


@dataclass
class MetricRecord:
    extractor: str
    study_name: str
    metric: str  # one number of a registered metric (fidmed.metrics.base): fd, rfd, precision, ..., kid, fd_inf
    value: float
    details: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)  # generator, kimg, modality, augmentation, ...

    @property
    def label(self) -> str:
        """Extractor name as shown to people; random-init extractors say so in the name itself."""
        return f"{self.extractor} [{RANDOM_BANNER}]" if self.protocol.get("random_init") else self.extractor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        if isinstance(d["value"], float) and not math.isfinite(d["value"]):
            d["value"] = None
        return d


def write_results_json(path: str | os.PathLike, records: Iterable[MetricRecord], header: dict[str, Any]) -> Path:
    """Atomic write of ``results.json``: a header (run, generator, config digest) and the records."""
    path = Path(path)
    payload = {**header, "results": [r.to_dict() for r in records]}
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
    return path


def results_table_rows(records: Iterable[MetricRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per extractor: every metric's number under its registered heading (fidmed.metrics.base), the
    details people read next to some of them, and the protocol columns needed to compare numbers. Returns the
    rows and the metric columns present, in the order the evaluation made them."""
    from fidmed.metrics.base import metric_columns

    headings = metric_columns()
    rows: dict[str, dict[str, Any]] = {}
    columns: list[str] = []
    for r in records:
        row = rows.setdefault(
            r.extractor,
            {
                "extractor": r.label,
                "study name": r.study_name,
                "weights": r.protocol.get("weights"),
                "input": f"{r.protocol.get('input_size')} {r.protocol.get('resizer')}",
                "N gen / real": f"{r.protocol.get('n_gen')} / {r.protocol.get('n_real')}",
                "seeds": r.protocol.get("seeds"),
            },
        )
        heading = headings.get(r.metric, r.metric)
        row[heading] = r.value
        new = [heading, *DETAIL_COLUMNS.get(r.metric, {})]
        for head, key in DETAIL_COLUMNS.get(r.metric, {}).items():
            row[head] = r.details.get(key)
        columns += [c for c in new if c not in columns]
    return list(rows.values()), columns


def random_init_note(records: Iterable[MetricRecord]) -> str:
    """The banner under a table with random-init numbers, saying why each extractor was random."""
    reasons = {}
    for r in records:
        if r.protocol.get("random_init"):
            reasons[r.extractor] = r.protocol.get("random_init_reason") or "chosen (weights: random)"
    if not reasons:
        return ""
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    return (
        f"\n!! {RANDOM_BANNER}: random weights ({why}). These numbers test the plumbing only and are NOT "
        f"comparable to any published FD.\n"
    )


def format_results_table(records: Iterable[MetricRecord], title: str = "Results") -> str:
    """A plain-text table (rich) of :func:`results_table_rows`."""
    from rich.console import Console
    from rich.table import Table

    records = list(records)
    rows, metric_cols = results_table_rows(records)
    table = Table(title=title, show_lines=False)
    columns = ["extractor", *metric_cols, "weights", "input", "N gen / real", "seeds"]
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v)))
        table.add_row(*cells)
    console = Console(width=160, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    return cap.get() + random_init_note(records)
