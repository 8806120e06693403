"""The tabular SafeDPO check (pipeline/theory.py) asserts what the theory says.

Where the thresholds come from (default `TheoryConfig`: K=8 prompts, M=6 responses with 2 unsafe,
β=1, 100 000 BT-labelled pairs ≈ 833 per response pair, 4000 full-batch GD steps, lr=1, tol=0.01):

* DPO only ever sees comparisons, so it converges to π̂* ∝ π_ref·exp(r̂/β)·1[safe] with r̂ the
  Bradley-Terry MLE of those comparisons, not to π* itself. The distance to π* therefore splits as
      TV(π_θ, π*) ≤ TV(π_θ, π̂*) + TV(π̂*, π*)
                  = optimisation error     + sampling error.
  The optimisation error must fall below `tolerance`. The sampling error is bounded by the 99th
  percentile of TV(π̂*, π*) under the asymptotic law of the BT MLE, r̂ − r ~ N(0, I⁺) with I the
  Fisher information of the actual comparison counts (`sampling_bounds`): ≈ 0.017 here.
* Unsafe responses only ever lose after T(D), so their mass decays (~1/t under GD at Δ = 0) but
  never reaches 0: "near zero" means below `tolerance` after the step budget.
* Δ leaves the optimum where it is (Prop. 4.4), so every Δ must land within `tolerance` of the same
  π̂*, hence within 2·tolerance of each other.

The whole module takes ~10 s (one shared run of the default configuration).
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from itertools import combinations, pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import objectives
from pipeline import theory as T
from pipeline.config import TheoryConfig
from pipeline.errors import UserError
from pipeline.objectives import Objective, select_pairs
from pipeline.selection import transform_actions

CFG = TheoryConfig()


@pytest.fixture(scope="module")
def result() -> T.TheoryResult:
    return T.run_theory(CFG)


def _safedpo_runs(result: T.TheoryResult) -> dict[str, dict]:
    """SafeDPO run metrics in the order of `CFG.deltas` (ascending)."""
    names = [T.run_name("safedpo", d) for d in CFG.deltas]
    return {name: result.metrics["runs"][name] for name in names}


def test_closed_form_is_the_constrained_optimum() -> None:
    """π* maximises E_π[r] − β·KL(π‖π_ref) over policies with no mass on unsafe responses.

    The maximum is β·log Σ_safe π_ref·exp(r/β) (Gibbs variational principle); π* attains it to
    float precision and no random safe policy beats it.
    """
    rng = np.random.default_rng(0)
    ref_logp = np.log(rng.dirichlet(np.ones(6), size=4))
    rewards = rng.normal(size=(4, 6))
    unsafe = np.zeros((4, 6), dtype=bool)
    unsafe[:, :2] = True
    beta = 0.7
    pi = T.safe_optimum(ref_logp, rewards, unsafe, beta)
    assert np.all(pi[unsafe] == 0) and np.allclose(pi.sum(1), 1)

    def objective(p: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * (np.log(p) - ref_logp), 0.0).sum(1)
        return (p * rewards).sum(1) - beta * kl

    best = beta * np.log((np.exp(ref_logp + rewards / beta) * ~unsafe).sum(1))
    np.testing.assert_allclose(objective(pi), best, atol=1e-12)
    for _ in range(200):
        other = rng.dirichlet(np.ones(6), size=4) * ~unsafe
        other /= other.sum(1, keepdims=True)
        assert np.all(objective(other) <= best + 1e-12)


def test_bt_mle_recovers_scores_from_exact_counts() -> None:
    """With win counts equal to their expectations, the BT MLE is the true score (up to a shift)."""
    s = np.array([[0.3, -1.2, 0.9, 0.0]])
    n = 50.0
    wins = n / (1 + np.exp(-(s[0][:, None] - s[0][None, :])))
    np.fill_diagonal(wins, 0)
    est = T.bt_mle(wins[None], np.ones_like(s, dtype=bool))
    np.testing.assert_allclose(est, s - s.mean(), atol=1e-9)


def test_pairs_cover_every_response_pair_in_the_normalized_schema() -> None:
    """Every response pair of every prompt is compared ⌊n/U⌋ or ⌈n/U⌉ times (so no response keeps
    its reference ratio for want of data), labels follow the schema, and T(D) drops exactly the
    unsafe-vs-unsafe pairs and swaps exactly the unsafe-beats-safe ones."""
    cfg = TheoryConfig(n_pairs=1000, seed=3)
    problem = T.make_problem(cfg)
    pairs = problem.pairs
    assert list(pairs.columns) == ["pair_id", "prompt_id", "prompt", "response_0", "response_1",
                                   "unsafe_0", "unsafe_1", "better_id", "safer_id"]
    assert len(pairs) == cfg.n_pairs
    assert pairs["better_id"].dtype == np.int8 and pairs["unsafe_0"].dtype == bool
    assert (problem.unsafe.sum(1) == T.n_unsafe_per_prompt(cfg)).all()

    a = pairs["response_0"].str[1:].astype(int)
    b = pairs["response_1"].str[1:].astype(int)
    key = pd.DataFrame({"p": pairs["prompt"], "lo": np.minimum(a, b), "hi": np.maximum(a, b)})
    counts = key.value_counts()
    n_combos = cfg.n_prompts * cfg.n_responses * (cfg.n_responses - 1) // 2
    assert len(counts) == n_combos
    assert counts.min() >= cfg.n_pairs // n_combos and counts.max() <= -(-cfg.n_pairs // n_combos)

    differ = pairs["unsafe_0"] != pairs["unsafe_1"]
    safer_unsafe = np.where(pairs["safer_id"] == 0, pairs["unsafe_0"], pairs["unsafe_1"])
    assert not safer_unsafe[differ.to_numpy()].any()

    _, c = select_pairs(pairs, "safedpo")
    winner_unsafe = np.where(pairs["better_id"] == 0, pairs["unsafe_0"], pairs["unsafe_1"])
    both = (pairs["unsafe_0"] & pairs["unsafe_1"]).to_numpy()
    assert c.dropped == both.sum()
    assert c.swapped == (winner_unsafe & ~both).sum()


def test_safedpo_reaches_the_safe_optimum_at_every_delta(result: T.TheoryResult) -> None:
    """For every Δ: unsafe mass ≤ tol; TV(π_θ, π̂*) ≤ tol; TV(π_θ, π*) ≤ q99(TV(π̂*, π*)) + tol.

    The last bound is the triangle inequality of the module docstring; the budget is chosen so
    that it is small (≈ 0.027), which is asserted too so the check cannot become vacuous.
    The realised sampling error must itself lie under its predicted q99 (else the BT asymptotics,
    or the data, are wrong).
    Log-ratios among safe responses: RMS error against (r_i − r_j)/β is bounded the same way,
    q99 of its sampling law (≈ 0.08 nats) + 0.05 nats of optimisation error. The optimisation
    part is given 0.05 nats, not a TV-sized 0.01, because it sits on the least likely safe
    responses, which the fading push away from unsafe ones lifts most; measured ≈ 0.03.
    """
    th = result.metrics["theory"]
    tol = CFG.tolerance
    tv_bound = th["tv_sampling_q99"] + tol
    assert tv_bound <= 0.03
    assert th["mle_opt_tv_to_opt"] <= th["tv_sampling_q99"]
    assert th["mle_opt_logratio_rmse"] <= th["logratio_rmse_sampling_q99"]
    for name, r in _safedpo_runs(result).items():
        assert r["unsafe_mass"] <= tol, name
        assert r["tv_to_mle_opt"] <= tol, name
        assert r["tv_to_opt"] <= tv_bound, name
        assert r["logratio_rmse_to_mle"] <= 0.05, name
        assert r["logratio_rmse"] <= th["logratio_rmse_sampling_q99"] + 0.05, name


def test_margin_does_not_move_the_optimum(result: T.TheoryResult) -> None:
    """Prop. 4.4: all Δ share one optimum, so final policies are within 2·tol of each other
    (each is within tol of the same π̂*)."""
    finals = [np.exp(result.runs[T.run_name("safedpo", d)].final_logp) for d in CFG.deltas]
    for p, q in combinations(finals, 2):
        assert 0.5 * np.abs(p - q).sum(1).mean() <= 2 * CFG.tolerance


def test_larger_margin_reaches_the_unsafe_tolerance_sooner(result: T.TheoryResult) -> None:
    """Steps to unsafe mass ≤ tol strictly decrease with Δ, and Δ_max is ≥ 4× faster than Δ = 0.

    One safe-vs-unsafe log-ratio gap d under GD moves as d' ∝ σ(Δ − β·d): it needs
    T(Δ) ∝ g + e^{−Δ}(e^{g} − 1) to reach the gap g that brings the unsafe mass from π_ref's
    ≈ 0.31 to 0.01 (g ≈ 3.8 nats at β = 1). Hence T(0)/T(10) ≈ (g + e^g − 1)/g ≈ 12 and
    T(5)/T(10) ≈ 1.08 (measured: 8.9 and 1.07; the gaps of one prompt are coupled through the
    shared softmax, which the one-gap model ignores, hence the slack down to 4).
    """
    steps = [r["steps_to_unsafe_tol"] for r in _safedpo_runs(result).values()]
    assert all(s is not None for s in steps)
    assert all(a > b for a, b in pairwise(steps)), steps
    assert steps[0] >= 4 * steps[-1], steps


def test_the_check_passes_safedpo_at_every_delta(result: T.TheoryResult) -> None:
    """The verdict written to metrics.json: every check holds at every Δ for the real SafeDPO
    (with several Δ, the margin ordering is a real check, not None)."""
    assert result.metrics["objective_under_test"] == "safedpo"
    assert result.metrics["passed"] is True
    for name, r in _safedpo_runs(result).items():
        assert r["passed"] is True, name
        assert all(v is True for v in r["checks"].values()), (name, r["checks"])
    assert result.metrics["theory"]["tdd_rule"] == {"keep": 53658, "swap": 39675, "drop": 6667}


def _swap_becomes_drop(h_w: np.ndarray, h_l: np.ndarray) -> np.ndarray:
    action = transform_actions(h_w, h_l)
    return np.where(action == "swap", "drop", action)


def _keeps_both_unsafe(h_w: np.ndarray, h_l: np.ndarray) -> np.ndarray:
    action = transform_actions(h_w, h_l)
    return np.where(action == "drop", "keep", action)


class _FlippedMargin(Objective):
    """SafeDPO with +(h_l − h_w)·Δ inside the sigmoid instead of −: the margin pulls back."""

    def loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, h_chosen: torch.Tensor,
             h_rejected: torch.Tensor, beta: float, delta: float) -> objectives.LossTensors:
        return super().loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, h_chosen,
                            h_rejected, beta, -delta)


_SAFEDPO = objectives.get("safedpo")
MUTANTS = {
    "swap_replaced_by_drop": (replace(_SAFEDPO, name="mut_drop", actions=_swap_becomes_drop),
                              "pairs_are_tdd"),
    "keeps_both_unsafe": (replace(_SAFEDPO, name="mut_keep", actions=_keeps_both_unsafe),
                          "pairs_are_tdd"),
    "flipped_margin_sign": (_FlippedMargin(**{f.name: getattr(_SAFEDPO, f.name)
                                              for f in fields(Objective)}), "margin_speeds_up"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_check_fails_each_mutant_at_every_delta(mutant: str) -> None:
    """Each mutant of SafeDPO, passed in as the objective under test, fails at every Δ run.

    A T(D) that drops what it should swap, or keeps both-unsafe pairs, still has unsafe
    responses only ever losing to safe ones, so its policy heads for the same π̂* (measured:
    every policy check holds); only its pairs differ from the rule (`pairs_are_tdd`).
    A flipped margin is the true loss at Δ = 0, so no measurement of that run alone can tell;
    beside the other Δ runs it is the fastest where it should be the slowest
    (`margin_speeds_up`: 629 steps at Δ = 0 against 1426 at Δ = 1, and Δ ≥ 5 never reaches
    the tolerance).
    """
    objective, failing = MUTANTS[mutant]
    res = T.run_theory(CFG, objective, baselines=())
    runs = res.metrics["runs"]
    assert list(runs) == [T.run_name(objective, d) for d in CFG.deltas]
    assert res.metrics["passed"] is False
    for name, r in runs.items():
        assert r["passed"] is False, name
        assert r["checks"][failing] is False, (name, r["checks"])


def test_safebetter_reaches_the_same_optimum_more_slowly(result: T.TheoryResult) -> None:
    """dpo_safebetter keeps only pairs whose helpfulness winner is safe: unsafe responses still
    only lose, and its safe-vs-safe pairs are those of T(D), so it heads for the same π̂*. It
    loses T(D)'s swapped pairs: 25% of its pairs push off an unsafe response against 57% of
    SafeDPO's, so at Δ = 0 it needs more steps (measured 2365 against 629; asserted ≥ 2×)."""
    runs = result.metrics["runs"]
    sb, d0 = runs["dpo_safebetter"], runs[T.run_name("safedpo", 0.0)]
    assert sb["pairs"]["swapped"] == 0 and sb["pairs"]["kept"] == d0["pairs"]["kept"]
    assert sb["unsafe_mass"] <= CFG.tolerance
    assert sb["tv_to_mle_opt"] <= CFG.tolerance
    assert sb["steps_to_unsafe_tol"] >= 2 * d0["steps_to_unsafe_tol"]
    assert "checks" not in sb  # baselines are reported, not judged


def test_baselines_behave_as_the_theory_says(result: T.TheoryResult) -> None:
    """dpo_helpful heads for π_ref·exp(r/β) over all responses, whose unsafe mass (≈ 0.56 by
    construction: unsafe answers carry a reward bonus) is far above zero: it must keep at least
    half of it (the BT sampling error moves it by ~0.01). dpo_harmless becomes safe but ranks safe
    responses by a cost unrelated to r, so it stays far from π* (TV ≥ 0.1, SafeDPO ≈ 0.013)."""
    th = result.metrics["theory"]
    runs = result.metrics["runs"]
    assert th["helpful_opt_unsafe_mass"] >= 20 * CFG.tolerance
    assert runs["dpo_helpful"]["unsafe_mass"] >= 0.5 * th["helpful_opt_unsafe_mass"]
    assert runs["dpo_helpful"]["steps_to_unsafe_tol"] is None
    assert runs["dpo_harmless"]["unsafe_mass"] <= CFG.tolerance
    assert runs["dpo_harmless"]["tv_to_opt"] >= 0.1


def test_curves_have_one_row_per_run_and_step(result: T.TheoryResult) -> None:
    curves = result.curves
    assert list(curves.columns) == T.CURVE_COLUMNS
    assert not curves.duplicated(["run", "step"]).any()
    assert len(curves) == (len(CFG.deltas) + len(T.BASELINES)) * (CFG.steps + 1)
    step0 = curves[curves["step"] == 0]
    assert np.allclose(step0["unsafe_mass"], result.metrics["theory"]["ref_unsafe_mass"])


def test_config_rejects_a_budget_that_cannot_cover_every_pair() -> None:
    with pytest.raises(UserError, match=r"theory\.n_pairs"):
        TheoryConfig(n_prompts=8, n_responses=6, n_pairs=100)


def test_stage_writes_curves_metrics_and_plot(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import theory as stage

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"theory": {"n_prompts": 3, "n_responses": 4,
                                                 "n_pairs": 600, "steps": 50,
                                                 "deltas": [0.0, 5.0]}}))
    monkeypatch.chdir(tmp_path)
    stage.run(params)
    curves = pd.read_parquet(stage.CURVES)
    assert set(curves["run"]) == {"safedpo_d0", "safedpo_d5", "dpo_helpful", "dpo_harmless",
                                  "dpo_safebetter"}
    metrics = json.loads(stage.METRICS.read_text())
    assert set(metrics) >= {"problem", "theory", "runs"}
    assert stage.PLOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
