"""Judge kinds, each declared once: how the judge stage builds and measures it, and how
evaluation loads it back from the judge directory (what `objectives.py` is for objectives).

* `offline`: linear models trained here on the data's own labels (`pipeline/offline_judge.py`);
* `hub`: hub score models, the paper's protocol (`pipeline/score_models.py`);
* `guard`: a generative guard for the cost (`pipeline/guard.py`), with a hub reward model
  (`judge.reward_model`) or the offline one trained here beside it.

The stage calls `build_judge` and evaluation `load_judge`; neither branches on the kind.
Adding a kind is one entry in `JUDGE_KINDS` (and its name in `config.JudgeKindName`, which
`config.py` validates without importing the judges; tests/test_judges.py checks they match).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artifacts import frame_hash
from pipeline.config import JudgeConfig
from pipeline.errors import UserError
from pipeline.guard import build_guard_judge, describe_guard, guard_reward, load_guard_judge
from pipeline.judges import (
    JUDGE_JSON,
    PAIR_COLUMNS,
    Judge,
    StoredScorer,
    judge_accuracy,
    read_judge_record,
)
from pipeline.offline_judge import OfflineJudge, load_recorded, train_offline_judges
from pipeline.score_models import build_hub_judge, describe_hub_models, describe_score_model
from pipeline.selection import responses_long

# Responses on which the guard's probability of either answer token is reported.
ANSWER_MASS_SAMPLE = 32


@dataclass(frozen=True)
class JudgeInputs:
    """What the judge stage hands a kind: its config, the test pairs it is measured on, the
    train pairs (read only by the kinds that train on them), the seed of the measuring sample,
    and the judge directory it will be written to."""

    cfg: JudgeConfig
    test: pd.DataFrame
    train: Callable[[], pd.DataFrame]
    seed: int
    judge_dir: Path


@dataclass
class Built:
    """A built, measured judge: its test metrics, the weights to store beside judge.json, and
    warnings for the stage log. The kind adds what it resolved to the record it was given."""

    metrics: dict[str, Any]
    models: Mapping[str, StoredScorer] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JudgeKind:
    name: str
    build: Callable[[JudgeInputs, dict[str, Any]], Built]
    load: Callable[[Path, Mapping[str, Any], int, str | None], Judge]


def _record_train(record: dict[str, Any], train: pd.DataFrame) -> None:
    record["data"].update(train_hash=frame_hash(train, PAIR_COLUMNS), n_train_pairs=len(train))


def _build_offline(inputs: JudgeInputs, record: dict[str, Any]) -> Built:
    train = inputs.train()
    judges = train_offline_judges(train, inputs.test, inputs.cfg.offline)
    _record_train(record, train)
    record["features"] = dataclasses.asdict(judges.judge.cost_model.spec)
    record["train_metrics"] = judges.train_metrics
    return Built(judges.test_metrics, judges.models)


def _load_offline(judge_dir: Path, record: Mapping[str, Any], batch_size: int,
                  device: str | None) -> Judge:
    return OfflineJudge(cost_model=load_recorded(judge_dir, record, "cost"),
                        reward_model=load_recorded(judge_dir, record, "reward"))


def _build_hub(inputs: JudgeInputs, record: dict[str, Any]) -> Built:
    cfg = inputs.cfg
    # Resolve (and download) first so that a bad path fails before any slow loading.
    record["models"] = describe_hub_models(cfg)
    record["max_length"] = cfg.max_length
    # Load through the record, exactly as evaluation will, then measure.
    judge = _load_hub(inputs.judge_dir, record, cfg.batch_size, None)
    return Built(judge_accuracy(judge, inputs.test, max_pairs=cfg.eval_pairs, seed=inputs.seed))


def _load_hub(judge_dir: Path, record: Mapping[str, Any], batch_size: int,
              device: str | None) -> Judge:
    return build_hub_judge(record["models"], max_length=int(record["max_length"]),
                           batch_size=batch_size, device=device)


def _build_guard(inputs: JudgeInputs, record: dict[str, Any]) -> Built:
    """The guard's cost with the hub reward model, or with the offline one trained here."""
    cfg, test = inputs.cfg, inputs.test
    # Resolve and load first, so that a bad path or prompt setting fails before any training.
    record["guard"] = describe_guard(cfg.guard)
    judge = build_guard_judge(record["guard"], batch_size=cfg.batch_size)
    models = None
    if cfg.reward_model:
        record["reward_model"] = describe_score_model(cfg.reward_model, cfg.layout)
        record["max_length"] = cfg.max_length
        judge.reward_model = guard_reward(inputs.judge_dir, record, batch_size=cfg.batch_size)
    else:
        train = inputs.train()
        offline = train_offline_judges(train, test, cfg.offline)
        _record_train(record, train)
        record["features"] = dataclasses.asdict(offline.judge.reward_model.spec)
        # The offline cost classifier, trained anyway, is a yardstick for the guard.
        record["offline_test_metrics"] = offline.test_metrics
        judge.reward_model = offline.judge.reward_model
        models = {"reward": offline.judge.reward_model}
    record["guard"]["identity"] = judge.identity()
    metrics = judge_accuracy(judge, test, max_pairs=cfg.eval_pairs, seed=inputs.seed)
    sample = responses_long(test).head(ANSWER_MASS_SAMPLE)
    mass = float(np.mean(judge.answer_mass(sample["prompt"].astype(str).tolist(),
                                           sample["response"].astype(str).tolist())))
    record["guard"]["answer_mass"] = mass
    warnings = []
    if mass < 0.5:
        warnings.append(f"the guard gives its two answer tokens only {mass:.2f} of its "
                        "probability; check judge.guard.template, answer_prefix and the answers")
    return Built(metrics, models, warnings)


def _load_guard(judge_dir: Path, record: Mapping[str, Any], batch_size: int,
                device: str | None) -> Judge:
    return load_guard_judge(judge_dir, record, batch_size=batch_size, device=device)


JUDGE_KINDS: dict[str, JudgeKind] = {k.name: k for k in (
    JudgeKind("offline", _build_offline, _load_offline),
    JudgeKind("hub", _build_hub, _load_hub),
    JudgeKind("guard", _build_guard, _load_guard),
)}


def build_judge(inputs: JudgeInputs, record: dict[str, Any]) -> Built:
    """Build and measure the judge of `inputs.cfg.kind`, adding what it resolved to `record`."""
    return JUDGE_KINDS[inputs.cfg.kind].build(inputs, record)


def load_judge(judge_dir: Path, batch_size: int = 16, *, device: str | None = None) -> Judge:
    """The judge written by the `judge` stage. Accuracies are in `read_judge_record(...)`."""
    judge_dir = Path(judge_dir)
    record = read_judge_record(judge_dir)
    kind = JUDGE_KINDS.get(str(record.get("kind")))
    if kind is None:
        raise UserError(f"unknown judge kind {record.get('kind')!r}", path=judge_dir / JUDGE_JSON)
    return kind.load(judge_dir, record, batch_size, device)
