"""Plain tables (lists of dicts) to and from CSV, and Parquet when pyarrow is installed.

fidmed's analysis tables are small (hundreds of rows), so they stay as ``list[dict]`` without pandas. Every
reader keeps each row's 1-based line number in the file (``row_number``) so that error messages can point at it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from fidmed.errors import DataError, FidmedError


def canonical_sha256(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON: sorted keys, no whitespace, non-JSON values as ``str``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_csv_rows(path: str | os.PathLike, required: Sequence[str] = (), what: str = "table") -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings (header = first line); checks that ``required`` columns exist.

    Adds nothing and drops nothing: a blank line is an error, since it usually means a truncated export.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the path (a .csv with a header line).")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{what} {path} is empty (no header line).")
        header = [c.strip() for c in reader.fieldnames]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{what} {path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(header)}).")
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{what} {path} line {line} has more fields than its header.")
            if all((v is None or str(v).strip() == "") for v in row.values()):
                raise DataError(
                    f"{what} {path} line {line} is blank; remove it (a blank line usually means a "
                    f"truncated or hand-edited file)."
                )
            rows.append({k: ("" if v is None else v.strip()) for k, v in row.items()})
    return rows


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return "" if value is None else value


def columns_of(rows: Iterable[Mapping[str, Any]], first: Sequence[str] = ()) -> list[str]:
    """Column names in order: ``first`` (those present) then every other key in order of appearance."""
    seen = dict.fromkeys(k for row in rows for k in row)
    return [c for c in first if c in seen] + [c for c in seen if c not in first]


def write_csv_rows(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` as CSV (floats with full precision via ``repr``; NaN as ``nan``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns) if columns is not None else columns_of(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return path


def write_table(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """CSV, or Parquet when ``path`` ends with ``.parquet`` (needs pyarrow)."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        return write_csv_rows(path, rows, columns)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FidmedError(f"writing {path} needs pyarrow (`pip install pyarrow`); or write a .csv file.") from None
    columns = list(columns) if columns is not None else columns_of(rows)
    data = {c: [_parquet_cell(row.get(c)) for row in rows] for c in columns}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), path)
    return path


def _parquet_cell(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def read_table(path: str | os.PathLike, required: Sequence[str] = (), what: str = "table") -> list[dict[str, Any]]:
    """A CSV (strings) or Parquet table (typed values) as a list of dicts."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        return read_csv_rows(path, required, what)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FidmedError(f"reading {path} needs pyarrow (`pip install pyarrow`); or pass a .csv file.") from None
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the path.")
    rows = pq.read_table(path).to_pylist()
    header = list(rows[0]) if rows else []
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{what} {path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(header)}).")
    return rows


def parse_float(value: Any, where: str) -> float:
    """A number from a table cell; ``where`` names the cell in the error message."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = "" if value is None else str(value).strip()
    if text == "":
        raise DataError(f"{where} is empty; every row needs a number there.")
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where} is {text!r}, not a number.") from None


def parse_exact(value: Any, where: str) -> Fraction:
    """The exact number in a table cell: the decimal (or ``a/b``) as written, not its nearest float, so that
    ``0.56`` is 14/25 and ``56`` is 56. A float (a Parquet cell) stands for the decimal of its shortest repr, the
    decimal it was typed or written as. Non-finite numbers are errors; callers that accept ``nan`` check it first."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where} is {value}, not a finite number.")
        return Fraction(repr(value))
    text = "" if value is None else str(value).strip()
    if text == "":
        raise DataError(f"{where} is empty; every row needs a number there.")
    try:
        return Fraction(text)  # every decimal spelling float() reads, and a/b; not nan or inf
    except (ValueError, ZeroDivisionError):
        finite = text.lower().lstrip("+-") not in ("nan", "inf", "infinity")
        raise DataError(f"{where} is {text!r}, not a {'' if finite else 'finite '}number.") from None


def format_list(items: Iterable[Any], limit: int = 12) -> str:
    """``a, b, c`` or ``a, b, ... (N in all)`` for long lists."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"
