"""`safedpo download`: fetch `dataset.name` into data/raw/ (see pipeline/sources.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import write_json, write_parquet
from pipeline.config import load_params
from pipeline.sources import arrow_safe, fetch


def run(params_file: Path) -> None:
    params = load_params(params_file)
    raw = fetch(params.dataset)
    manifest = raw.manifest()
    write_parquet(arrow_safe(raw.train), paths.RAW_TRAIN)
    write_parquet(arrow_safe(raw.test), paths.RAW_TEST)
    write_json(manifest, paths.SOURCE_JSON)
    rev = f" @ {raw.revision}" if raw.revision else ""
    print(f"download: {raw.source}{rev} ({raw.kind}): {len(raw.train)} train, "
          f"{len(raw.test)} test rows -> {paths.RAW_DIR}")
