"""`builtin:toy` is deterministic and has the properties its docstring promises (measured)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from pipeline import toydata
from pipeline.config import ToyConfig
from pipeline.normalize import normalize_splits

CFG = ToyConfig(n_train=5000, n_test=1000, seed=3, label_noise=0.1)


@pytest.fixture(scope="module")
def toy() -> tuple[pd.DataFrame, pd.DataFrame]:
    return toydata.generate_with_meta(CFG)


def _words(s: pd.Series) -> pd.Series:
    return s.str.split().str.len()


def _any_word(words: list[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b")


def test_deterministic_and_seeded() -> None:
    cfg = ToyConfig(n_train=300, n_test=60, seed=11)
    a, b = toydata.generate(cfg), toydata.generate(cfg)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    other = toydata.generate(ToyConfig(n_train=300, n_test=60, seed=12))
    assert not a[0]["prompt"].equals(other[0]["prompt"])
    # The test split does not depend on the train size (each split has its own generator).
    bigger = toydata.generate(ToyConfig(n_train=500, n_test=60, seed=11))
    pd.testing.assert_frame_equal(a[1], bigger[1])


def test_exact_pku30k_schema(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = toydata.generate(ToyConfig(n_train=50, n_test=10))
    for df, n in ((train, 50), (test, 10)):
        assert list(df.columns) == toydata.PKU_COLUMNS
        assert len(df) == n
        assert df["is_response_0_safe"].dtype == bool
        assert set(df["better_response_id"]) <= {0, 1} and set(df["safer_response_id"]) <= {0, 1}
        assert df.notna().all().all()


def test_coverage_and_variety(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = toy
    for df in (train, test):
        cats = df.groupby("kind")["category"].nunique()
        assert cats["harmful"] >= 8 and cats["benign"] >= 8
        assert (df["kind"] == "sensitive").any()
    assert train["prompt"].nunique() >= 1000
    assert test["prompt"].nunique() >= 300
    responses = pd.concat([train["response_0"], train["response_1"]])
    assert responses.nunique() >= 2000
    # Held-out tasks: no prompt, base or task is shared between the splits.
    assert not set(train["prompt"]) & set(test["prompt"])
    bases = toydata.split_bases(CFG.seed)
    assert not {b[3] for b in bases["train"]} & {b[3] for b in bases["test"]}
    assert not {b[2] for b in bases["train"]} & {b[2] for b in bases["test"]}
    # Held-out fragments: no category step of a test response is ever shown in train.
    frags = toydata.split_fragments(CFG.seed)
    for cat in toydata.HARM:
        assert frags["test"][cat] and not set(frags["train"][cat]) & set(frags["test"][cat])
    train_text = " ".join(pd.concat([train["response_0"], train["response_1"]]))
    assert not any(step in train_text for c in toydata.HARM for step in frags["test"][c])
    # No test response is a phrase repeated from train
    # (`test_no_first_word_shortcut_and_no_verbatim_overlap`).


def test_lengths_and_ascii(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, _ = toy
    p = _words(train["prompt"])
    assert p.min() >= 5 and p.max() <= 25
    for col in ("response_0", "response_1"):
        w = _words(train[col])
        # Roughly 10-60 words; a concise answer is one step of a few words.
        assert w.min() >= 3 and w.quantile(0.1) >= 8 and w.max() <= 90
        assert 15 <= w.mean() <= 40
        assert train[col].map(str.isascii).all()
    assert train["prompt"].map(str.isascii).all()


def test_refusal_openers_rule(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """A refusal opens with a refusal prefix, after at most a lead-in; no other response
    contains one (in any case)."""
    train, _ = toy
    long = pd.concat([train[[f"response_{i}", f"style_{i}"]].set_axis(["text", "style"], axis=1)
                      for i in (0, 1)])
    refusal = long["style"].str.startswith("refusal")
    leads = "|".join(map(re.escape, toydata.LEAD_INS))
    opening = long["text"].str.replace(f"^(?:{leads}) ", "", regex=True).str.lower()
    starts = opening.str.startswith(tuple(p.lower() for p in toydata.REFUSAL_PREFIXES))
    assert starts[refusal].all()
    contains = long["text"].str.lower().str.contains(
        "|".join(re.escape(p.lower()) for p in toydata.REFUSAL_PREFIXES))
    assert not contains[~refusal].any()
    assert refusal.mean() > 0.2  # a real share of refusals to learn from
    # Some refusals open with a lead-in, as other styles do: the first word does not say.
    assert 0.5 < (~long["text"].str.startswith(toydata.REFUSAL_PREFIXES))[refusal].mean() < 0.95


def _responses(df: pd.DataFrame) -> pd.DataFrame:
    """Every response of `df` with its unsafe flag, one row each."""
    return pd.DataFrame({
        "text": pd.concat([df["response_0"], df["response_1"]], ignore_index=True),
        "unsafe": ~pd.concat([df["is_response_0_safe"], df["is_response_1_safe"]],
                             ignore_index=True)})


def first_word_balanced_accuracy(train: pd.DataFrame, test: pd.DataFrame) -> float:
    """Balanced accuracy on the test responses of the rule "look up the first word of a response
    in train; unsafe where more of train's responses opening with it are unsafe than of all of
    train's" (the threshold that suits balanced accuracy best; a word train never opens with
    is called safe)."""
    tr, te = _responses(train), _responses(test)
    first = lambda s: s.str.split().str[0]  # noqa: E731
    base = tr["unsafe"].mean()
    said = (first(te["text"]).map(tr["unsafe"].groupby(first(tr["text"])).mean())
            .fillna(base) > base).to_numpy()
    unsafe = te["unsafe"].to_numpy()
    return 0.5 * float(said[unsafe].mean() + (~said[~unsafe]).mean())


def overlap(train: pd.DataFrame, test: pd.DataFrame, n: int = 5) -> dict[str, float]:
    """Share of test responses that occur verbatim among train's, and share of the test
    responses' n-word sequences (all of them, repeats counted) that occur in a train response."""
    tr, te = _responses(train)["text"], _responses(test)["text"]

    def grams(text: str) -> list[tuple[str, ...]]:
        w = text.split()
        return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]

    seen = {g for t in tr for g in grams(t)}
    test_grams = [g for t in te for g in grams(t)]
    return {"verbatim": float(te.isin(set(tr)).mean()),
            f"{n}gram": float(np.mean([g in seen for g in test_grams]))}


@pytest.mark.parametrize("cfg", [ToyConfig(), CFG], ids=["default", "seed3"])
def test_no_first_word_shortcut_and_no_verbatim_overlap(cfg: ToyConfig) -> None:
    """Measured: the first-word rule 0.540 (default 2000/400, seed 0) and 0.548 (5000/1000,
    seed 3), where it was 0.864 and 0.875 when each style opened with phrases of its own;
    verbatim overlap 0 and 0 (it was 13.6% and 17.9%); 5-gram overlap 0.46 and 0.49 (0.55 and
    0.58 before; what is shared are connectives, openers and closings: the topic of a test
    response, its task and steps, is held out)."""
    train, test = toydata.generate(cfg)
    assert first_word_balanced_accuracy(train, test) <= 0.65
    got = overlap(train, test)
    assert got["verbatim"] <= 0.02
    assert got["5gram"] < 0.6
    # The rule is not blind: on a split's own responses, the lead-ins aside, it finds refusals.
    assert first_word_balanced_accuracy(train, train) > 0.5


def _shortcut_accuracies(test: pd.DataFrame) -> dict[str, float]:
    """Accuracy of the two rules a benchmark must not be solvable by: "unsafe iff the response
    names a word of the harm lexicon" (plain and balanced) and "the longer response is better"
    (ties count half)."""
    lex = _any_word([w for ws in toydata.harm_lexicon().values() for w in ws])
    text = pd.concat([test["response_0"], test["response_1"]])
    unsafe = ~pd.concat([test["is_response_0_safe"], test["is_response_1_safe"]])
    flagged = text.str.contains(lex)
    n0, n1 = _words(test["response_0"]), _words(test["response_1"])
    longer_wins = np.where(n0 == n1, 0.5, (n1 > n0) == (test["better_response_id"] == 1))
    return {"keyword": float((flagged == unsafe).mean()),
            "keyword_balanced": 0.5 * float(flagged[unsafe].mean() + (~flagged[~unsafe]).mean()),
            "length": float(longer_wins.mean())}


def test_shortcuts_are_weak_and_the_judge_is_not() -> None:
    """Measured on the default toy data (2000/400, seed 0): keyword 0.818 (balanced 0.793),
    longer-is-better 0.650, against the offline judges' 0.959 (balanced 0.939) and 0.938 on
    the test pairs, whose tasks and step fragments train never shows (before responses shared
    openers and closings across labels, the judges read those: 0.998 and 0.920)."""
    offline_judge = pytest.importorskip("pipeline.offline_judge")
    from pipeline.config import OfflineJudgeConfig

    train, test = toydata.generate(ToyConfig())
    short = _shortcut_accuracies(test)
    assert short["keyword"] < 0.9 and short["keyword_balanced"] < 0.86
    assert short["length"] < 0.66
    pairs_train, pairs_test, _ = normalize_splits(train, test)
    got = offline_judge.train_offline_judges(pairs_train, pairs_test,
                                             OfflineJudgeConfig()).test_metrics
    assert got["cost_accuracy"] > short["keyword"] + 0.08
    assert got["cost_balanced_accuracy"] > short["keyword_balanced"] + 0.08
    assert got["reward_accuracy"] > short["length"] + 0.2


def test_unsafe_answers_do_not_share_one_lexicon(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, _ = toy
    every = _any_word([w for ws in toydata.harm_lexicon().values() for w in ws])
    long = pd.concat([train[[f"response_{i}", f"style_{i}"]].set_axis(["text", "style"], axis=1)
                      for i in (0, 1)])
    named = long["text"].str.contains(every).groupby(long["style"]).mean()
    assert named["unsafe_covert"] == 0.0  # compliance without any harm word
    assert named["safety_info"] == 1.0  # safe warnings that name the harm
    assert 0.2 < named["unsafe_sloppy"] < 0.8


def test_builtin_suites_are_held_out(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = toy
    tasks = toydata.split_tasks(CFG.seed)
    for name, kind, refuse in (("redteam", "harmful", True), ("overrefusal", "sensitive", False)):
        suite = toydata.builtin_suite(name, CFG.seed)
        held = [t for (k, _), ts in tasks["test"].items() if k == kind for t in ts]
        assert len(suite) == len(held) * len(toydata.SUITE_TEMPLATES)
        assert (suite["should_refuse"] == refuse).all()
        assert suite["prompt"].is_unique
        # Neither the phrasing nor the task occurs in any training prompt.
        assert not set(suite["prompt"]) & (set(train["prompt"]) | set(test["prompt"]))
        assert not any(t in p for t in held for p in train["prompt"])
    assert set(toydata.builtin_suite("redteam", CFG.seed)["category"]) == set(toydata.HARM)


def test_preference_structure(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, _ = toy
    harmful = train[train["kind"] == "harmful"]
    u0, u1 = ~harmful["is_response_0_safe"], ~harmful["is_response_1_safe"]
    b = harmful["better_response_id"]
    unsafe_winner = np.where(b == 0, u0, u1)
    assert unsafe_winner.mean() >= 0.6  # helpfulness often rewards the unsafe answer
    both_unsafe = (u0 & u1).mean()
    assert 0.06 <= both_unsafe <= 0.14  # T(D) has something to drop
    safe_winner_unsafe_loser = np.where(b == 0, ~u0 & u1, ~u1 & u0).mean()
    assert safe_winner_unsafe_loser > 0.02
    benign = train[train["kind"] != "harmful"]
    assert benign["is_response_0_safe"].all() and benign["is_response_1_safe"].all()
    # Noise-free helpfulness follows the documented style ranking on harmful prompts.
    rank = {s: h for s, (h, _) in toydata.HARMFUL_STYLES.items()}
    h0 = harmful["style_0"].map(rank)
    h1 = harmful["style_1"].map(rank)
    assert (harmful["clean_better_id"] == np.where(h0 > h1, 0, 1)).all()
    # Response order is random, so either position wins about half of the time.
    assert 0.45 <= train["better_response_id"].mean() <= 0.55


def test_label_noise_rate_and_consistency(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, _ = toy
    n = len(train)
    tol = 4 * np.sqrt(CFG.label_noise * (1 - CFG.label_noise) / n)
    flipped = (train["better_response_id"] != train["clean_better_id"]).mean()
    assert abs(flipped - CFG.label_noise) < tol
    same = train["is_response_0_safe"] == train["is_response_1_safe"]
    safer_flipped = train["safer_response_id"] != train["clean_safer_id"]
    assert not safer_flipped[~same].any()  # noise never creates a contradiction
    tol_same = 4 * np.sqrt(CFG.label_noise * (1 - CFG.label_noise) / same.sum())
    assert abs(safer_flipped[same].mean() - CFG.label_noise) < tol_same
    noiseless = toydata.generate_with_meta(ToyConfig(n_train=500, n_test=50, label_noise=0.0))[0]
    assert (noiseless["better_response_id"] == noiseless["clean_better_id"]).all()
    assert (noiseless["safer_response_id"] == noiseless["clean_safer_id"]).all()


def test_normalize_accepts_every_toy_row(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = toy
    pairs_train, pairs_test, report = normalize_splits(train[toydata.PKU_COLUMNS],
                                                       test[toydata.PKU_COLUMNS])
    assert report["train"]["rows_rejected"] == 0 and report["test"]["rows_rejected"] == 0
    assert len(pairs_train) == CFG.n_train and len(pairs_test) == CFG.n_test
    types = report["train"]["pair_types"]
    assert min(types["safe_safe"], types["safe_unsafe"], types["unsafe_safe"],
               types["unsafe_unsafe"]) > 0


@pytest.mark.parametrize("shares", [(1.0, 0.0), (0.0, 0.0), (0.0, 1.0)])
def test_extreme_shares(shares: tuple[float, float]) -> None:
    harmful, sensitive = shares
    train, _ = toydata.generate_with_meta(
        ToyConfig(n_train=200, n_test=20, harmful_share=harmful, sensitive_share=sensitive))
    expected = "harmful" if harmful == 1 else ("sensitive" if sensitive == 1 else "benign")
    assert set(train["kind"]) == {expected}


def test_shared_refusal_detector_agrees(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """The evaluation's refusal detector finds exactly the toy refusals."""
    judges = pytest.importorskip("pipeline.judges")
    train, _ = toy
    texts = pd.concat([train["response_0"], train["response_1"]])
    styles = pd.concat([train["style_0"], train["style_1"]])
    found = judges.is_refusal(texts.tolist())
    assert (found == styles.str.startswith("refusal").to_numpy()).all()
