"""Evaluation results: one record per (extractor, metric), each with the protocol that made it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fidmed.atomic import atomic_write

RANDOM_BANNER = "RANDOM-INIT"
# metrics shown in the table only when present (precision/recall in the standard real-first order, see
# fidmed.metrics.knn)
OPTIONAL_COLUMNS = {"precision": "P", "recall": "R", "density": "D", "coverage": "C", "kid": "KID",
                    "fd_inf": "FD-inf"}


@dataclass
class MetricRecord:
    extractor: str
    study_name: str
    metric: str  # 'fd' | 'rfd' | 'precision' | 'recall' | 'density' | 'coverage' | 'kid' | 'fd_inf'
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


def results_table_rows(records: Iterable[MetricRecord]) -> list[dict[str, Any]]:
    """One row per extractor: FD, relative FD and the protocol columns people need to compare numbers."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r.extractor, {
            "extractor": r.label, "study name": r.study_name, "weights": r.protocol.get("weights"),
            "input": f"{r.protocol.get('input_size')} {r.protocol.get('resizer')}",
            "N gen / real": f"{r.protocol.get('n_gen')} / {r.protocol.get('n_real')}",
            "seeds": r.protocol.get("seeds"), "FD": None, "rFD": None})
        if r.metric == "fd":
            row["FD"] = r.value
            row["route"] = r.details.get("route")
        elif r.metric == "rfd":
            row["rFD"] = r.value
            row["FD real split"] = r.details.get("fd_real_split")
        elif r.metric in OPTIONAL_COLUMNS:
            row[OPTIONAL_COLUMNS[r.metric]] = r.value
    return list(rows.values())


def format_results_table(records: Iterable[MetricRecord], title: str = "Results") -> str:
    """A plain-text table (rich) of :func:`results_table_rows`."""
    from rich.console import Console
    from rich.table import Table

    rows = results_table_rows(records)
    table = Table(title=title, show_lines=False)
    columns = ["extractor", "FD", "rFD", "FD real split", "route"]
    columns += [c for c in OPTIONAL_COLUMNS.values() if any(c in row for row in rows)]
    columns += ["weights", "input", "N gen / real", "seeds"]
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
    text = cap.get()
    if any(r.protocol.get("random_init") for r in records):
        text += (f"\n!! {RANDOM_BANNER}: at least one extractor above has random weights (no real weights were "
                 f"available). Its numbers test the plumbing only and are NOT comparable to any published FD.\n")
    return text
