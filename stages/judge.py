"""`safedpo judge`: train the offline judges on the pairs' labels, or resolve hub score models or
a generative guard, measure the judge on the test pairs, and write `data/judge/` in one atomic
swap."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artifacts import frame_hash, read_parquet
from pipeline.config import JudgeConfig, load_params
from pipeline.guard import build_guard_judge, describe_guard, guard_reward
from pipeline.judges import PAIR_COLUMNS, judge_accuracy, versions, write_judge_dir
from pipeline.offline_judge import train_offline_judges
from pipeline.paths import JUDGE_DIR, PAIRS_TEST, PAIRS_TRAIN
from pipeline.score_models import build_hub_judge, describe_hub_models, describe_score_model
from pipeline.selection import responses_long

# Responses on which the guard's probability of either answer token is reported.
ANSWER_MASS_SAMPLE = 32


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
    if cfg.kind == "offline":
        train = read_parquet(PAIRS_TRAIN, required=PAIR_COLUMNS)
        judges = train_offline_judges(train, test, cfg.offline)
        spec = judges.judge.cost_model.spec
        record["data"].update(train_hash=frame_hash(train, PAIR_COLUMNS), n_train_pairs=len(train))
        record["features"] = dataclasses.asdict(spec)
        record["train_metrics"] = judges.train_metrics
        metrics = judges.test_metrics
        write_judge_dir(JUDGE_DIR, {**record, **metrics, "test_metrics": metrics}, judges.models)
    elif cfg.kind == "guard":
        metrics = _guard(cfg, test, record, params.seed)
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


def _guard(cfg: JudgeConfig, test: pd.DataFrame, record: dict[str, Any],
           seed: int) -> dict[str, Any]:
    """The guard's cost with the hub reward model, or with the offline one trained here."""
    # Resolve and load first, so that a bad path or prompt setting fails before any training.
    record["guard"] = describe_guard(cfg.guard)
    judge = build_guard_judge(record["guard"], batch_size=cfg.batch_size)
    models = None
    if cfg.reward_model:
        record["reward_model"] = describe_score_model(cfg.reward_model, cfg.layout)
        record["max_length"] = cfg.max_length
        judge.reward_model = guard_reward(JUDGE_DIR, record, batch_size=cfg.batch_size)
    else:
        train = read_parquet(PAIRS_TRAIN, required=PAIR_COLUMNS)
        offline = train_offline_judges(train, test, cfg.offline)
        record["data"].update(train_hash=frame_hash(train, PAIR_COLUMNS), n_train_pairs=len(train))
        record["features"] = dataclasses.asdict(offline.judge.reward_model.spec)
        # The offline cost classifier, trained anyway, is a yardstick for the guard.
        record["offline_test_metrics"] = offline.test_metrics
        judge.reward_model = offline.judge.reward_model
        models = {"reward": offline.judge.reward_model}
    record["guard"]["identity"] = judge.identity()
    metrics = judge_accuracy(judge, test, max_pairs=cfg.eval_pairs, seed=seed)
    sample = responses_long(test).head(ANSWER_MASS_SAMPLE)
    mass = float(np.mean(judge.answer_mass(sample["prompt"].astype(str).tolist(),
                                           sample["response"].astype(str).tolist())))
    record["guard"]["answer_mass"] = mass
    if mass < 0.5:
        print(f"judge: warning: the guard gives its two answer tokens only {mass:.2f} of its "
              "probability; check judge.guard.template, answer_prefix and the answers")
    write_judge_dir(JUDGE_DIR, {**record, **metrics, "test_metrics": metrics}, models)
    return metrics


def _report(kind: str, m: dict[str, Any]) -> None:
    print(f"judge ({kind}) on {m['n_pairs']} test pairs: "
          f"cost accuracy {m['cost_accuracy']:.3f} (balanced {m['cost_balanced_accuracy']:.3f}) "
          f"on {m['n_responses']} responses, reward accuracy {m['reward_accuracy']:.3f}; "
          f"wrote {JUDGE_DIR}/")
