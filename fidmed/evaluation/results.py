"""Evaluation results: one record per (extractor, metric), each with the protocol that made it.

A number evaluated with ``eval.uncertainty`` carries ``details["uncertainty"]`` (standard error, interval, how the
replicates were drawn, and the replicate values: fidmed.metrics.uncertainty); the memorisation audit adds records
``authenticity``, ``copies`` and ``ct`` per feature space (every extractor and ``pixels``), whose per-image results
and grid of closest pairs :func:`write_audit_files` writes next to results.json.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fidmed.atomic import atomic_write

RANDOM_BANNER = "RANDOM-INIT"
AUDIT_DIR = "audit"  # beside results.json: <space>.csv (every generated image) and <space>_closest.png (the grid)
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
    #: large by-products that do not go into results.json (the audit's per-image result and image grid)
    arrays: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        """Extractor name as shown to people; random-init extractors say so in the name itself."""
        return f"{self.extractor} [{RANDOM_BANNER}]" if self.protocol.get("random_init") else self.extractor

    @property
    def uncertainty(self) -> dict[str, Any] | None:
        """The number's ``uncertainty`` entry (None when eval.uncertainty was off)."""
        return self.details.get("uncertainty")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, arrays={}))
        d.pop("arrays")
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
    from fidmed.metrics.memorisation import AUDIT_METRICS

    headings = {**metric_columns(), **AUDIT_METRICS}
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
        unc = r.uncertainty
        if unc:
            ci = f"{heading} {round(100 * unc['level'])}% CI"
            row[ci] = f"[{unc['ci_low']:.4g}, {unc['ci_high']:.4g}]" if unc.get("available") else "n/a"
            new.insert(1, ci)
        columns += [c for c in new if c not in columns]
    return list(rows.values()), columns


def trust_note(records: Iterable[MetricRecord]) -> str:
    """Under a table: how the intervals were made, and what the audit flagged (one line each)."""
    records = list(records)
    lines = []
    unc = next((r.uncertainty for r in records if r.uncertainty), None)
    if unc:
        lines.append(
            f"CI: {round(100 * unc['level'])}% bootstrap intervals, {unc['replicates']} replicates "
            f"(seed {unc['seed']}, units of {unc['block_size']} image(s)), resampling {unc['covers']}; "
            "docs/metrics.md#uncertainty."
        )
    if any(r.metric == "copies" for r in records):
        lines.append(
            "Audit: ratio = distance to the nearest training image / that image's own nearest-neighbour distance; "
            "copies: ratio below the threshold; C_T << 0: data copying (needs eval.audit.heldout); "
            "docs/metrics.md#memorisation-audit."
        )
    return "".join(f"\n{line}" for line in lines) + ("\n" if lines else "")


def summary_values(records: Iterable[MetricRecord]) -> dict[str, float | None]:
    """The W&B summary of an evaluation: every number, and its standard error and interval where computed."""
    out: dict[str, float | None] = {}
    for r in records:
        key = f"{r.metric}/{r.label}"
        out[key] = r.value
        unc = r.uncertainty
        if unc and unc.get("available"):
            out[f"{r.metric}_se/{r.label}"] = unc["se"]
            out[f"{r.metric}_ci_low/{r.label}"] = unc["ci_low"]
            out[f"{r.metric}_ci_high/{r.label}"] = unc["ci_high"]
    return out


def write_audit_files(folder: str | os.PathLike, records: Iterable[MetricRecord]) -> list[Path]:
    """For every audited feature space: ``<folder>/audit/<space>.csv`` (each generated image's nearest training
    image, distances, ratio, flag) and ``<folder>/audit/<space>_closest.png`` (the closest pairs, generated left);
    the paths go into the audit records' details (``per_image``, ``grid``). Returns the files written."""
    from PIL import Image

    from fidmed.analysis.tabular import write_csv_rows
    from fidmed.metrics.memorisation import per_image_rows

    out = Path(folder) / AUDIT_DIR
    written: list[Path] = []
    done: dict[str, dict[str, str | None]] = {}
    for r in records:
        res = r.arrays.get("audit")
        if res is None:
            continue
        if r.extractor not in done:
            name = r.extractor.replace("/", "_")
            csv = write_csv_rows(
                out / f"{name}.csv", per_image_rows(res, _seeds(r.protocol.get("seeds"), len(res.ratio)))
            )
            paths: dict[str, str | None] = {"per_image": str(csv), "grid": None}
            written.append(csv)
            grid = r.arrays.get("grid")
            if grid is not None:
                png = out / f"{name}_closest.png"
                with atomic_write(png) as f:
                    Image.fromarray(grid).save(f, format="PNG")
                paths["grid"] = str(png)
                written.append(png)
            done[r.extractor] = paths
        r.details.update(done[r.extractor])
    return written


def _seeds(seeds: Any, n: int) -> list[int] | None:
    """The seed of each generated image from a protocol's ``seeds`` ("0-49999"), None for a folder of images."""
    try:
        start, _, end = str(seeds).partition("-")
        first, last = int(start), int(end)
    except ValueError:
        return None
    return list(range(first, first + n)) if last - first + 1 == n else None


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


def _render(table: Any) -> str:
    from rich.console import Console

    console = Console(width=160, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def format_results_table(records: Iterable[MetricRecord], title: str = "Results") -> str:
    """A plain-text table (rich) of :func:`results_table_rows`; then, where computed, how far each number can move
    (one line per number: value, standard error, interval) and the memorisation audit (one line per space)."""
    from rich.table import Table

    from fidmed.metrics.memorisation import AUDIT_METRICS

    records = list(records)
    rows, metric_cols = results_table_rows(records)
    audit_cols = set(AUDIT_METRICS.values())
    main_cols = [c for c in metric_cols if c not in audit_cols and not c.endswith("% CI")]
    table = Table(title=title, show_lines=False)
    columns = ["extractor", *main_cols, "weights", "input", "N gen / real", "seeds"]
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        if any(c in row for c in main_cols):
            table.add_row(*(_cell(row.get(c)) for c in columns))
    out = _render(table)
    with_unc = [r for r in records if r.uncertainty]
    if with_unc:
        unc = Table(title="How far each number can move (bootstrap)", show_lines=False)
        for c in ("extractor", "number", "value", "SE", "interval", "CI", "replicates", "resampled"):
            unc.add_column(c, overflow="fold")
        for r in with_unc:
            u = r.uncertainty
            ok = u.get("available")
            unc.add_row(
                r.label,
                r.metric,
                _cell(r.value),
                f"{u['se']:.4g}" if ok else "n/a",
                f"{round(100 * u['level'])}% {u.get('interval', '')}",
                f"[{u['ci_low']:.4g}, {u['ci_high']:.4g}]" if ok else f"n/a ({u.get('reason')})",
                f"{u.get('n_valid', 0)} / {u['replicates']}",
                " + ".join(u["resampled"]),
            )
        out += _render(unc)
    audited = {r.extractor: r for r in records if r.metric == "copies"}
    if audited:
        aud = Table(title="Memorisation audit (the training set is the real set)", show_lines=False)
        for c in ("space", "authenticity", "copies", "flagged", "median ratio", "lowest ratio", "C_T"):
            aud.add_column(c, overflow="fold")
        values = {(r.extractor, r.metric): r.value for r in records}
        ct_records = {r.extractor: r for r in records if r.metric == "ct"}
        for space, r in audited.items():
            closest = r.details.get("closest") or [{}]
            aud.add_row(
                r.label,
                _cell(values.get((space, "authenticity"))),
                _cell(r.value),
                f"{r.details.get('n_flagged')} / {r.details.get('n_gen')} (ratio < {r.details.get('threshold')})",
                _cell(r.details.get("ratio_median")),
                _cell(closest[0].get("ratio")),
                _ct_cell(ct_records.get(space)),
            )
        out += _render(aud)
    return out + trust_note(records) + random_init_note(records)


def _ct_cell(record: Any) -> str:
    """C_T, or n/a and why (no held-out split, too few generated images per cell) where its value is NaN."""
    value = None if record is None else record.value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        reason = (record.details.get("reason") if record is not None else None) or "not computed"
        return f"n/a ({reason})"
    return _cell(value)
