"""`safedpo inspect PATH`: a readable summary of any Parquet artifact.

Prints the schema, the row count, per-column statistics (nulls, distinct values; for bool and
integer columns the mean or the value counts, for strings the mean length) and the first rows
with long strings shortened, so an artifact can be checked without opening a notebook.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

MAX_CELL = 40
MAX_VALUE_COUNTS = 5


def _load(path: Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", path=path)
    if path.is_dir():
        raise UserError("is a folder; give a .parquet file inside it", path=path)
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"not a readable Parquet file ({first})", path=path) from None


def _short(value: object, limit: int = MAX_CELL) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _distinct(s: pd.Series) -> int:
    try:
        return int(s.nunique(dropna=True))
    except TypeError:  # nested values (struct -> dict, list -> array) are unhashable
        return int(s.dropna().map(str).nunique())


def _summary(s: pd.Series, arrow_type: pa.DataType) -> str:
    if pa.types.is_boolean(arrow_type):
        return f"mean {s.dropna().astype(bool).mean():.3f}" if s.notna().any() else "all null"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        vals = s.dropna()
        if len(vals) == 0:
            return "all null"
        if pa.types.is_integer(arrow_type) and vals.nunique() <= MAX_VALUE_COUNTS:
            counts = vals.value_counts().sort_index()
            return ", ".join(f"{k}: {v}" for k, v in counts.items())
        return f"mean {vals.mean():.4g}, min {vals.min():.4g}, max {vals.max():.4g}"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        lengths = s.dropna().str.len()
        return f"mean length {lengths.mean():.1f}, max {lengths.max()}" if len(lengths) else ""
    return ""


def describe(path: Path, rows: int = 5) -> str:
    """Schema, row count, per-column statistics and the first `rows` rows of a Parquet file."""
    if rows < 0:
        raise UserError(f"--rows must be >= 0, got {rows}")
    table = _load(Path(path))
    df = table.to_pandas()
    lines = [f"{path}: {table.num_rows} rows x {table.num_columns} columns", "", "schema:"]
    width = max((len(f.name) for f in table.schema), default=4)
    lines += [f"  {f.name:<{width}}  {f.type}{'' if f.nullable else ' not null'}"
              for f in table.schema]
    lines += ["", "statistics:"]
    stats = []
    for f in table.schema:
        s = df[f.name]
        stats.append({"column": f.name, "nulls": int(s.isna().sum()),
                      "distinct": _distinct(s),
                      "summary": _summary(s, f.type)})
    if stats:
        lines += ["  " + line for line in pd.DataFrame(stats).to_string(index=False).splitlines()]
    if rows and table.num_rows:
        head = df.head(rows).map(_short)
        lines += ["", f"first {len(head)} rows:"]
        lines += ["  " + line for line in head.to_string().splitlines()]
    return "\n".join(lines)
