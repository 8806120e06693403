"""DVC stage `suites`: the held-out prompt suites of params.yaml `suites:` -> data/suites/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.artifacts import write_json, write_parquet
from pipeline.config import load_params
from pipeline.suite_sources import fetch_suite
from pipeline.suites import SUITE_SCHEMA, combine, map_layout


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    frames: list = []
    records: dict[str, Any] = {}
    for cfg in params.suites:
        raw, record = fetch_suite(cfg, params.dataset.toy.seed)
        df, info = map_layout(raw, cfg)
        frames.append(df)
        records[cfg.name] = r = {**record, **info}
        print(f"suites: {cfg.name} ({r['source']}, layout {r['layout']}): {r['prompts']} "
              f"prompts, {r['should_refuse']} to refuse, {r['should_answer']} to answer, "
              f"{r['unlabelled']} unlabelled, {r['duplicates_dropped']} duplicates dropped")
        for what, ex in (r.get("excluded") or {}).items():
            print(f"suites: {cfg.name}: {ex['count']} {what} rows left out: {ex['reason']}")
    table = combine(frames)
    write_parquet(table, paths.SUITES_PROMPTS, schema=SUITE_SCHEMA)
    write_json(records, paths.SUITES_RECORD)
    print(f"suites: {len(table)} prompts in {len(records)} suite(s) -> {paths.SUITES_PROMPTS}")
