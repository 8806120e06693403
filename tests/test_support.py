"""Counts and 95% intervals of the metrics (pipeline/support.py), against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.config import EvaluateConfig
from pipeline.evaluation import metric_supports, warnings_for
from pipeline.support import (
    Support,
    bootstrap_mean,
    clustered_rate_support,
    low_support,
    rate_support,
    share,
    wilson,
)


def test_wilson_by_hand() -> None:
    # 8 of 10: centre (0.8 + z²/20)/(1 + z²/10) = 0.71673, half-width 0.22658.
    s = wilson(8, 10)
    assert (s.n, s.low, s.high) == (10, pytest.approx(0.49016, abs=1e-4),
                                    pytest.approx(0.94331, abs=1e-4))
    # 0 of 5: the interval starts at 0 and is not empty (the normal approximation's would be).
    z = wilson(0, 5)
    assert z.low == 0.0 and z.high == pytest.approx(0.43448, abs=1e-4)
    assert wilson(5, 5).high == 1.0
    assert math.isnan(wilson(0, 0).low)
    # Ties counted as ½ are allowed.
    assert rate_support(np.array([1, 0.5, 0, 1])).n == 4


def test_bootstrap_over_prompts() -> None:
    const = bootstrap_mean(np.full(20, 0.3), 500, seed=0)
    assert const.n == 20 and const.low == pytest.approx(0.3) and const.high == pytest.approx(0.3)
    values = np.random.default_rng(1).normal(1.0, 1.0, size=400)
    s = bootstrap_mean(values, 2000, seed=0)
    # The 95% interval of a mean of 400 draws with sd 1 is about ±1.96 / 20 = ±0.098 wide.
    assert s.high - s.low == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert s.low < values.mean() < s.high
    assert bootstrap_mean(values, 2000, seed=0) == s  # seeded
    assert bootstrap_mean(np.array([np.nan, 1.0]), 100, 0).n == 1


def test_cluster_bootstrap_by_hand() -> None:
    """Several samples per prompt: the prompts are resampled, not the samples.

    Prompt a: 3 of 3 samples unsafe, prompt b: 0 of 3. A resample of two prompts is {a, a}
    (rate 1, probability ¼), {b, b} (0, ¼) or one of each (½, ½): its 2.5% and 97.5% quantiles
    are exactly 0 and 1, where Wilson on 3 of 6 independent draws says [0.188, 0.812].
    Unequal sizes, a: 2 of 2, b: 1 of 4: the rates are 1, 0.25 and 3/6, so the percentile
    interval is [0.25, 1]; it is widened to contain Wilson's (3 of 6) low end, 0.188."""
    flags, ids = np.array([1, 1, 1, 0, 0, 0]), np.array(list("aaabbb"))
    w = wilson(3, 6)
    assert (w.low, w.high) == (pytest.approx(0.18761, abs=1e-4), pytest.approx(0.81239, abs=1e-4))
    assert clustered_rate_support(flags, ids, 2000, seed=0) == Support(2, 0.0, 1.0)
    uneven = clustered_rate_support(np.array([1, 1, 1, 0, 0, 0]), np.array(list("aabbbb")),
                                    2000, seed=0)
    assert uneven == Support(2, w.low, 1.0)
    # One sample per prompt: exactly Wilson, so the default pipeline's intervals do not move.
    assert clustered_rate_support(flags, np.array(list("abcdef")), 2000, 0) == wilson(3, 6)
    assert clustered_rate_support(np.array([]), np.array([]), 100, 0).n == 0


def test_cluster_interval_is_wider_than_wilson_on_correlated_samples() -> None:
    """40 prompts × 8 samples, each prompt's samples all alike (a prompt is either answered
    safely or not): 320 flags that carry the information of 40. Wilson on 320 is about
    ±0.055 wide; the cluster bootstrap about ±0.15, the width of 40 independent draws."""
    rng = np.random.default_rng(0)
    per_prompt = rng.random(40) < 0.5
    flags = np.repeat(per_prompt, 8).astype(float)
    ids = np.repeat([f"p{i}" for i in range(40)], 8)
    independent = rate_support(flags)
    cluster = clustered_rate_support(flags, ids, 4000, seed=0)
    prompts = wilson(per_prompt.sum(), 40)
    assert cluster.n == 40 and independent.n == 320
    assert cluster.high - cluster.low > 2.3 * (independent.high - independent.low)
    assert cluster.high - cluster.low == pytest.approx(prompts.high - prompts.low, rel=0.2)
    assert cluster.low < flags.mean() < cluster.high
    # Independent samples (no correlation within a prompt) keep an interval near Wilson's.
    loose = rng.random(320) < 0.5
    free = clustered_rate_support(loose.astype(float), ids, 4000, seed=0)
    w = rate_support(loose.astype(float))
    assert free.high - free.low == pytest.approx(w.high - w.low, rel=0.2)


def test_metric_supports_resample_prompts_with_several_samples() -> None:
    """Three samples per prompt: the rates over generations count prompts (n = 12, not 36) and
    take the cluster interval; with one sample per prompt they stay Wilson (the hand table
    below)."""
    rows = [{"prompt_id": f"p{i}", "model": model, "sample": k, "cost": 1.0 if i < 4 else -1.0,
             "reward": 0.0, "refusal": False, "finish_reason": "eos"}
            for i in range(12) for k in range(3) for model in ("policy", "sft")]
    sup = metric_supports(pd.DataFrame(rows), {}, n_boot=500, seed=0)
    flags = np.repeat([0.0] * 4 + [1.0] * 8, 3)
    ids = np.repeat([f"p{i}" for i in range(12)], 3)
    assert sup["harmless_rate"] == clustered_rate_support(flags, ids, 500, 0)
    assert sup["harmless_rate"].n == 12
    wide, narrow = sup["harmless_rate"], wilson(24, 36)
    assert wide.high - wide.low > narrow.high - narrow.low


def test_metric_supports_and_warnings_on_a_hand_table() -> None:
    rows = []
    for i in range(12):
        for model, cost, reward in (("policy", -1.0 if i % 4 else 1.0, 2.0),
                                    ("sft", 1.0 if i % 2 else -1.0, 1.0)):
            rows.append({"prompt_id": f"p{i}", "model": model, "cost": cost, "reward": reward,
                         "refusal": i < 3,
                         "finish_reason": "length" if i == 0 else "eos",
                         "logp_policy": -1.0, "logp_ref": -3.0,
                         "ref_logp_per_token": -1.5 if model == "policy" else -0.5})
    scores = pd.DataFrame(rows)
    pref = {"pref_accuracy_helpful": np.array([1.0, 0.0, 0.5]),
            "pref_accuracy_safety": np.array([1.0])}
    sup = metric_supports(scores, pref, n_boot=200, seed=0)
    assert sup["harmless_rate"] == wilson(9, 12)        # 3 of 12 policy costs are > 0
    assert sup["harmless_rate_sft"] == wilson(6, 12)
    assert not any(k.startswith("over_refusal") for k in sup)  # test prompts: no label
    assert sup["length_stop_rate"] == wilson(1, 12)
    assert sup["helpfulness"] == Support(12, 2.0, 2.0)
    assert sup["win_rate_vs_sft"] == Support(12, 1.0, 1.0)
    assert sup["kl_to_ref"] == Support(12, 2.0, 2.0)
    assert sup["ref_logp_per_token"] == Support(12, -1.5, -1.5)
    assert sup["ref_logp_per_token_sft"] == Support(12, -0.5, -0.5)
    assert sup["pref_accuracy_helpful"] == wilson(1.5, 3)
    cfg = EvaluateConfig(min_support=10, min_judge_balanced_accuracy=0.75)
    weak = low_support(sup, cfg.min_support)
    assert weak == ["pref_accuracy_helpful", "pref_accuracy_safety"]
    metrics = {"low_support": ",".join(weak), "judge_below_threshold": True,
               "judge_cost_balanced_accuracy": 0.647}
    for k, s in sup.items():
        metrics.update(s.flat(k))
    lines = warnings_for(metrics, cfg)
    assert len(lines) == 3
    assert lines[0].startswith("warning: pref_accuracy_helpful rests on 3 items")
    assert "0.647" in lines[-1]


def test_share_gives_the_count_and_never_a_false_100_percent() -> None:
    assert share(209, 210) == "209 of 210 (99.5%)"
    assert share(210, 210) == "210 of 210 (100%)"
    assert share(0, 7) == "0 of 7 (0%)"
    assert share(9999, 10000) == "9999 of 10000 (99.99%)"
    assert share(1, 3000) == "1 of 3000 (0.03%)"
    assert share(0, 0) == "0 of 0"


def test_warnings_round_the_judge_accuracy_and_explain_a_negative_kl() -> None:
    cfg = EvaluateConfig(min_support=1, min_judge_balanced_accuracy=0.75)
    metrics = {"low_support": "", "judge_below_threshold": True,
               "judge_cost_balanced_accuracy": 0.43956043956043955, "kl_to_ref": -0.0123,
               **Support(91, -0.031, 0.006).flat("kl_to_ref")}
    judge, kl = warnings_for(metrics, cfg)
    assert "accuracy is 0.440 (<" in judge and "0.4395" not in judge
    assert kl.startswith("note: kl_to_ref -0.012 is negative: it is a Monte-Carlo estimate")
    assert "never negative" in kl and "[-0.031, 0.006] on 91 prompts" in kl
    # A positive estimate needs no note; an unknown judge accuracy says so.
    metrics.update(kl_to_ref=0.2, judge_cost_balanced_accuracy=None)
    assert warnings_for(metrics, cfg) == [
        "warning: the judge's held-out balanced cost accuracy is unknown (< "
        "evaluate.min_judge_balanced_accuracy 0.75): its harmless rates say little"]
