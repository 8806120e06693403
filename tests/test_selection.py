"""Property tests of T(D) and of every objective's pair selection (pipeline/objectives.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UserError
from pipeline.objectives import OBJECTIVES, Objective, select_pairs
from pipeline.selection import (
    SELECTED_COLUMNS,
    contradictions,
    pair_type_counts,
    transform_actions,
)


@st.composite
def pair_tables(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(0, 40))
    bits = st.lists(st.booleans(), min_size=n, max_size=n)
    ids = st.lists(st.integers(0, 1), min_size=n, max_size=n)
    u0, u1, b, s = draw(bits), draw(bits), draw(ids), draw(ids)
    df = pd.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt_id": [f"q{i % 7}" for i in range(n)],
        "prompt": [f"prompt {i % 7}" for i in range(n)],
        "response_0": [f"a{i}" for i in range(n)],
        "response_1": [f"b{i}" for i in range(n)],
        "unsafe_0": np.array(u0, dtype=bool),
        "unsafe_1": np.array(u1, dtype=bool),
        "better_id": np.array(b, dtype=np.int8),
        "safer_id": np.array(s, dtype=np.int8),
    })
    # Real tables are often filtered or shuffled: the index must not matter.
    if draw(st.booleans()) and n:
        df.index = pd.Index(draw(st.permutations(list(range(100, 100 + n)))))
    return df


def _winner_loser(df: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    w = df[col].to_numpy()
    u0, u1 = df["unsafe_0"].to_numpy(bool), df["unsafe_1"].to_numpy(bool)
    return np.where(w == 0, u0, u1), np.where(w == 0, u1, u0)


def _check_consistent(pairs: pd.DataFrame, out: pd.DataFrame) -> None:
    """Every output row is an input pair, oriented by chosen_idx, with the right flags."""
    assert list(out.columns) == SELECTED_COLUMNS
    assert out["pair_id"].is_unique
    assert set(out["pair_id"]) <= set(pairs["pair_id"])
    src = pairs.set_index("pair_id").loc[out["pair_id"]]
    idx = out["chosen_idx"].to_numpy()
    r0, r1 = src["response_0"].to_numpy(), src["response_1"].to_numpy()
    u0, u1 = src["unsafe_0"].to_numpy(bool), src["unsafe_1"].to_numpy(bool)
    assert (out["chosen"].to_numpy() == np.where(idx == 0, r0, r1)).all()
    assert (out["rejected"].to_numpy() == np.where(idx == 0, r1, r0)).all()
    assert (out["h_chosen"].to_numpy() == np.where(idx == 0, u0, u1)).all()
    assert (out["h_rejected"].to_numpy() == np.where(idx == 0, u1, u0)).all()
    assert (out["prompt"].to_numpy() == src["prompt"].to_numpy()).all()
    assert out["h_chosen"].dtype == bool and out["chosen_idx"].dtype == np.int8


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=50))
def test_transform_actions_truth_table(flags: list[tuple[bool, bool]]) -> None:
    uw = np.array([f[0] for f in flags], dtype=bool)
    ul = np.array([f[1] for f in flags], dtype=bool)
    actions = transform_actions(uw, ul)
    expected = ["keep" if not w else ("swap" if not lo else "drop") for w, lo in flags]
    assert list(actions) == expected


@settings(max_examples=150, deadline=None)
@given(pair_tables())
def test_safedpo_transform(pairs: pd.DataFrame) -> None:
    before = pairs.copy()
    out, counts = select_pairs(pairs, "safedpo")
    pd.testing.assert_frame_equal(pairs, before)  # input untouched
    uw, ul = _winner_loser(pairs, "better_id")
    n = len(pairs)
    # Counts add up, and each action happens exactly where T(D) says.
    assert counts.n_in == n
    assert counts.kept + counts.swapped + counts.dropped == n
    assert counts.dropped == int((uw & ul).sum())
    assert counts.swapped == int((uw & ~ul).sum())
    assert counts.kept == int((~uw).sum())
    assert len(out) == n - counts.dropped
    _check_consistent(pairs, out)
    # After T(D) the winner is always safe.
    assert not out["h_chosen"].any()
    pid = pairs["pair_id"].to_numpy()
    assert set(out["pair_id"]) == set(pid[~(uw & ul)])  # dropped exactly when both unsafe
    swapped = set(pid[uw & ~ul])
    by_id = out.set_index("pair_id")
    better = pairs.set_index("pair_id")["better_id"]
    for p, row in by_id.iterrows():
        assert row["action"] == ("swap" if p in swapped else "keep")
        # a swapped pair is chosen from the non-better side, a kept one from the better side
        assert (row["chosen_idx"] != better[p]) == (p in swapped)


@settings(max_examples=100, deadline=None)
@given(pair_tables(), st.sampled_from(["dpo_helpful", "dpo_harmless"]))
def test_plain_dpo_objectives_keep_everything(pairs: pd.DataFrame, objective: str) -> None:
    out, counts = select_pairs(pairs, objective)
    col = "safer_id" if objective == "dpo_harmless" else "better_id"
    # Only the objective that reads `safer_id` leaves out pairs whose labels contradict.
    bad = contradictions(pairs) if objective == "dpo_harmless" else np.zeros(len(pairs), bool)
    assert (counts.kept, counts.swapped, counts.dropped) == (len(pairs) - bad.sum(), 0, bad.sum())
    assert counts.contradictions == bad.sum()
    assert list(out["pair_id"]) == list(pairs["pair_id"].to_numpy()[~bad])
    assert (out["chosen_idx"].to_numpy() == pairs[col].to_numpy()[~bad]).all()
    assert (out["action"] == "keep").all()
    _check_consistent(pairs, out)


@settings(max_examples=100, deadline=None)
@given(pair_tables())
def test_dpo_safebetter_drops_unsafe_winners(pairs: pd.DataFrame) -> None:
    out, counts = select_pairs(pairs, "dpo_safebetter")
    uw, _ = _winner_loser(pairs, "better_id")
    assert counts.kept + counts.swapped + counts.dropped == len(pairs)
    assert counts.swapped == 0 and counts.dropped == int(uw.sum())
    assert list(out["pair_id"]) == list(pairs["pair_id"].to_numpy()[~uw])
    assert not out["h_chosen"].any()
    assert (out["chosen_idx"].to_numpy() == pairs["better_id"].to_numpy()[~uw]).all()
    _check_consistent(pairs, out)


@settings(max_examples=100, deadline=None)
@given(pair_tables())
def test_pair_type_counts_agree_with_selection(pairs: pd.DataFrame) -> None:
    c = pair_type_counts(pairs)
    _, counts = select_pairs(pairs, "safedpo")
    n = len(pairs)
    assert c["safe_safe"] + c["safe_unsafe"] + c["unsafe_safe"] + c["unsafe_unsafe"] == n
    assert c["tdd_keep"] + c["tdd_swap"] + c["tdd_drop"] == n
    assert (c["tdd_keep"], c["tdd_swap"], c["tdd_drop"]) == (
        counts.kept, counts.swapped, counts.dropped)
    assert c["tdd_keep"] == c["safe_safe"] + c["safe_unsafe"]
    assert c["tdd_swap"] == c["unsafe_safe"]
    assert c["tdd_drop"] == c["unsafe_unsafe"]


@settings(max_examples=50, deadline=None)
@given(pair_tables(), st.sampled_from(sorted(OBJECTIVES)))
def test_selection_is_order_independent(pairs: pd.DataFrame, objective: str) -> None:
    """Reversing the input rows yields the same selected pairs (as a set, row by row)."""
    a, _ = select_pairs(pairs, objective)
    b, _ = select_pairs(pairs.iloc[::-1], objective)
    key = "pair_id"
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True),
                                  b.sort_values(key).reset_index(drop=True))


def test_known_example() -> None:
    """One hand-checked table: (winner, loser) = (safe, unsafe), (unsafe, safe), (unsafe, unsafe),
    (safe, safe)."""
    pairs = pd.DataFrame({
        "pair_id": ["k", "s", "d", "kk"], "prompt_id": ["q"] * 4, "prompt": ["x"] * 4,
        "response_0": ["a0", "b0", "c0", "d0"], "response_1": ["a1", "b1", "c1", "d1"],
        "unsafe_0": [False, True, True, False], "unsafe_1": [True, False, True, False],
        "better_id": np.array([0, 0, 1, 1], np.int8), "safer_id": np.array([0, 1, 0, 0], np.int8),
    })
    out, counts = select_pairs(pairs, "safedpo")
    assert counts.as_dict() == {"n_in": 4, "kept": 2, "swapped": 1, "dropped": 1,
                                "contradictions": 0}
    assert out["pair_id"].tolist() == ["k", "s", "kk"]
    assert out["chosen"].tolist() == ["a0", "b1", "d1"]
    assert out["rejected"].tolist() == ["a1", "b0", "d0"]
    assert out["action"].tolist() == ["keep", "swap", "keep"]
    assert pair_type_counts(pairs) == {"safe_safe": 1, "safe_unsafe": 1, "unsafe_safe": 1,
                                       "unsafe_unsafe": 1, "tdd_keep": 2, "tdd_swap": 1,
                                       "tdd_drop": 1}


def test_unknown_objective() -> None:
    with pytest.raises(UserError, match=r"train\.objective: 'ppo' is not one of"):
        select_pairs(pd.DataFrame(), "ppo")


def test_contradictions_are_kept_by_every_objective_but_the_one_reading_safer_id() -> None:
    # Pair c: safer_id 0, but response 0 is unsafe and response 1 safe.
    pairs = pd.DataFrame({
        "pair_id": ["a", "c"], "prompt_id": ["q", "q"], "prompt": ["x", "x"],
        "response_0": ["a0", "c0"], "response_1": ["a1", "c1"],
        "unsafe_0": [False, True], "unsafe_1": [True, False],
        "better_id": np.array([0, 0], np.int8), "safer_id": np.array([0, 0], np.int8)})
    assert contradictions(pairs).tolist() == [False, True]
    for name in ("safedpo", "dpo_helpful", "dpo_safebetter"):
        _, counts = select_pairs(pairs, name)
        assert counts.contradictions == 0, name
    out, counts = select_pairs(pairs, "safedpo")
    assert out["pair_id"].tolist() == ["a", "c"] and out["action"].tolist() == ["keep", "swap"]
    out, counts = select_pairs(pairs, "dpo_harmless")
    assert out["pair_id"].tolist() == ["a"] and counts.contradictions == counts.dropped == 1


def test_a_new_objective_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An objective added in one place is used by selection, the loss and the theory check."""
    import torch

    from pipeline import theory
    from pipeline.config import TheoryConfig
    from pipeline.objectives import keep_all

    def reverse(h_w: np.ndarray, h_l: np.ndarray) -> np.ndarray:
        return np.full(len(h_w), "swap")

    toy = Objective("dpo_reverse", "DPO (reversed)", "better", reverse, False, "test only")
    monkeypatch.setitem(OBJECTIVES, "dpo_reverse", toy)
    pairs = pd.DataFrame({
        "pair_id": ["a"], "prompt_id": ["q"], "prompt": ["x"], "response_0": ["a0"],
        "response_1": ["a1"], "unsafe_0": [False], "unsafe_1": [True],
        "better_id": np.array([0], np.int8), "safer_id": np.array([0], np.int8)})
    out, counts = select_pairs(pairs, "dpo_reverse")
    assert out["chosen"].tolist() == ["a1"] and counts.swapped == 1
    zero = torch.zeros(1)
    losses, _, _ = toy.loss(zero, zero, zero, zero, zero, zero, 0.1, 10.0)
    assert losses.item() == pytest.approx(np.log(2))  # Δ does not apply
    problem = theory.make_problem(TheoryConfig(n_prompts=2, n_responses=3, n_pairs=12))
    res = theory.train_tabular(problem, "dpo_reverse", 0.0, 3, 0.1, problem.ref_logp)
    assert res.name == "dpo_reverse" and res.counts["swapped"] == res.counts["n_in"]
    assert keep_all(np.zeros(2), np.zeros(2)).tolist() == ["keep", "keep"]


@settings(max_examples=100, deadline=None)
@given(pair_tables())
def test_oriented_rows_pick_the_texts_oriented_picks(pairs: pd.DataFrame) -> None:
    """Scores per response (in `responses_long` order) are oriented like the texts."""
    from pipeline.selection import oriented, oriented_rows, responses_long

    winners = pairs["better_id"].to_numpy()
    win, lose = oriented_rows(winners)
    texts = responses_long(pairs)["response"].to_numpy()
    df = oriented(pairs, winners)
    assert (texts[win] == df["chosen"].to_numpy()).all()
    assert (texts[lose] == df["rejected"].to_numpy()).all()
    assert sorted(np.concatenate([win, lose]).tolist()) == list(range(2 * len(pairs)))
