"""`safedpo normalize`: data/raw/ -> data/pairs/{train,test}.parquet + report.json."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import read_json, read_parquet, write_json, write_parquet
from pipeline.config import load_params
from pipeline.normalize import PAIRS_SCHEMA, normalize_splits


def run(params_file: Path) -> None:
    params = load_params(params_file)
    source = read_json(paths.SOURCE_JSON) if paths.SOURCE_JSON.exists() else {}
    origin = f" (from {source['source']})" if source.get("source") else ""
    train_raw = read_parquet(paths.RAW_TRAIN)
    test_raw = read_parquet(paths.RAW_TEST)
    where = {"train": f"{paths.RAW_TRAIN}{origin}", "test": f"{paths.RAW_TEST}{origin}"}
    train, test, report = normalize_splits(train_raw, test_raw, params.dataset.layout, where,
                                           params.dataset.allow_seen_test_prompts,
                                           params.dataset.max_text_chars)
    report["source"] = {k: source.get(k) for k in ("source", "kind", "revision")}
    write_parquet(train, paths.PAIRS_TRAIN, schema=PAIRS_SCHEMA)
    write_parquet(test, paths.PAIRS_TEST, schema=PAIRS_SCHEMA)
    write_json(report, paths.PAIRS_REPORT)
    for split in ("train", "test"):
        r = report[split]
        how = "detected" if params.dataset.layout == "auto" else "dataset.layout"
        reasons = {k: v for k, v in r["rejected_by_reason"].items() if v}
        tdd = r["pair_types"]
        print(f"normalize {split}: layout {r['layout']} ({how}); {r['rows_in']} in, "
              f"{r['rows_out']} out, {r['rows_rejected']} rejected {reasons or ''}; T(D) keep "
              f"{tdd['tdd_keep']}, swap {tdd['tdd_swap']}, drop {tdd['tdd_drop']}")
