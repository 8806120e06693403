"""`safedpo judge`: train the offline judges on the pairs' labels, or resolve hub score models,
measure either kind on the test pairs, and write `data/judge/` in one atomic swap."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.artifacts import frame_hash, read_parquet
from pipeline.config import load_params
from pipeline.judges import (
    PAIR_COLUMNS,
    build_hub_judge,
    describe_hub_models,
    judge_accuracy,
    train_offline_judges,
    versions,
    write_judge_dir,
)
from pipeline.paths import JUDGE_DIR, PAIRS_TEST, PAIRS_TRAIN


def run(params_file: Path) -> None:
    params = load_params(params_file)
    cfg = params.judge
    test = read_parquet(PAIRS_TEST, required=PAIR_COLUMNS)
    record: dict[str, Any] = {
        "kind": cfg.kind,
        "config": dataclasses.asdict(cfg),
        "data": {"test_hash": frame_hash(test, PAIR_COLUMNS), "n_test_pairs": len(test)},
        "versions": versions(),
        # The cost is a logit (offline) or a beaver cost: either way > 0 means unsafe.
        "cost_threshold": 0.0,
    }
    if cfg.kind == "offline":
        train = read_parquet(PAIRS_TRAIN, required=PAIR_COLUMNS)
        judges = train_offline_judges(train, test, cfg.offline)
        spec = judges.judge.cost_model.spec
        record["data"].update(train_hash=frame_hash(train, PAIR_COLUMNS), n_train_pairs=len(train))
        record["features"] = dataclasses.asdict(spec)
        record["train_metrics"] = judges.train_metrics
        metrics = judges.test_metrics
        write_judge_dir(JUDGE_DIR, {**record, **metrics, "test_metrics": metrics}, judges.models)
    else:
        # Resolve (and download) first so that a bad path fails before any slow loading.
        record["models"] = describe_hub_models(cfg)
        record["max_length"] = cfg.max_length
        # Load through the record, exactly as evaluation will, then measure.
        judge = build_hub_judge(record["models"], max_length=cfg.max_length,
                                batch_size=cfg.batch_size)
        metrics = judge_accuracy(judge, test, max_pairs=cfg.eval_pairs, seed=params.seed)
        write_judge_dir(JUDGE_DIR, {**record, **metrics, "test_metrics": metrics})
    _report(cfg.kind, metrics)


def _report(kind: str, m: dict[str, Any]) -> None:
    print(f"judge ({kind}) on {m['n_pairs']} test pairs: "
          f"cost accuracy {m['cost_accuracy']:.3f} (balanced {m['cost_balanced_accuracy']:.3f}) "
          f"on {m['n_responses']} responses, reward accuracy {m['reward_accuracy']:.3f}; "
          f"wrote {JUDGE_DIR}/")
