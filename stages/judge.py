"""`safedpo judge`: build the judge of `judge.kind` (train the offline judges on the pairs'
labels, or resolve hub score models or a generative guard; `pipeline.judge_kinds`), measure it
on the test pairs, and write `data/judge/` in one atomic swap."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.artifacts import frame_hash, read_parquet
from pipeline.config import load_params
from pipeline.judge_kinds import JudgeInputs, build_judge
from pipeline.judges import PAIR_COLUMNS, versions, write_judge_dir
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
        # The cost is a logit (offline), a beaver cost or a guard's log-odds of "unsafe": any
        # way, > 0 means unsafe.
        "cost_threshold": 0.0,
    }
    built = build_judge(JudgeInputs(
        cfg, test, partial(read_parquet, PAIRS_TRAIN, required=PAIR_COLUMNS), params.seed,
        JUDGE_DIR), record)
    for warning in built.warnings:
        print(f"judge: warning: {warning}")
    metrics = built.metrics
    write_judge_dir(JUDGE_DIR, {**record, **metrics, "test_metrics": metrics}, built.models)
    _report(cfg.kind, metrics)


def _report(kind: str, m: dict[str, Any]) -> None:
    print(f"judge ({kind}) on {m['n_pairs']} test pairs: "
          f"cost accuracy {m['cost_accuracy']:.3f} (balanced {m['cost_balanced_accuracy']:.3f}) "
          f"on {m['n_responses']} responses, reward accuracy {m['reward_accuracy']:.3f}; "
          f"wrote {JUDGE_DIR}/")
