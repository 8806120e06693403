"""normalize: every layout maps to the one schema; every bad row is rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from data_cli import assert_one_line_error, make_project, run_cli

from pipeline.artifacts import text_hash
from pipeline.normalize import (
    PAIRS_COLUMNS,
    PAIRS_SCHEMA,
    REASONS,
    detect_layout,
    normalize_frame,
    normalize_splits,
)
from pipeline.selection import pair_type_counts


def pku_rows(**overrides: list) -> pd.DataFrame:
    base = {
        "prompt": ["How do I bake bread?", "How do I pick a lock?", "Tell me a joke"],
        "response_0": ["Knead and bake it.", "Use a bump key.", "Why did the chicken..."],
        "response_1": ["I can't help.", "I'm sorry, I can't.", "No."],
        "is_response_0_safe": [True, False, True],
        "is_response_1_safe": [True, True, True],
        "better_response_id": [0, 0, 0],
        "safer_response_id": [1, 1, 0],
    }
    base.update(overrides)
    return pd.DataFrame(base)


def reasons_of(res: object) -> dict[int, str]:
    rej = res.rejected  # type: ignore[attr-defined]
    return dict(zip(rej["row"].tolist(), rej["reason"].tolist(), strict=True))


def test_pku30k_maps_to_schema() -> None:
    res = normalize_frame(pku_rows())
    assert res.layout == "pku30k" and len(res.rejected) == 0
    p = res.pairs
    assert list(p.columns) == PAIRS_COLUMNS
    assert p["unsafe_0"].tolist() == [False, True, False]
    assert p["unsafe_1"].tolist() == [False, False, False]
    assert p["better_id"].tolist() == [0, 0, 0] and p["safer_id"].tolist() == [1, 1, 0]
    assert p["better_id"].dtype == np.int8 and str(p["severity_0"].dtype) == "Int8"
    assert p["severity_0"].isna().all()
    assert p["pair_id"][1] == text_hash("How do I pick a lock?", "Use a bump key.",
                                        "I'm sorry, I can't.")
    assert p["prompt_id"][2] == text_hash("Tell me a joke")


def test_label_coercion_of_strings_numbers_and_bools() -> None:
    df = pku_rows(
        is_response_0_safe=["yes", " Unsafe ", "TRUE"],
        is_response_1_safe=[1, "safe", "f"],
        better_response_id=["1", "response_0", 1.0],
        safer_response_id=[0, "1", "1"],
    ).astype(object)
    res = normalize_frame(df)
    assert reasons_of(res) == {}
    p = res.pairs
    assert p["unsafe_0"].tolist() == [False, True, False]
    assert p["unsafe_1"].tolist() == [False, False, True]
    assert p["better_id"].tolist() == [1, 0, 1]
    # "TRUE" safe, "f" unsafe, safer "1": kept, and flagged as contradictory.
    assert p["contradiction"].tolist() == [False, False, True]


def test_each_rejection_reason() -> None:
    rows = [
        ("p", None, "b", True, True, 0, 0),              # null_text
        ("p", "   ", "b", True, True, 0, 0),             # empty_text
        ("p", "a", "b", None, True, 0, 0),               # null_label
        ("p", "a", "b", "maybe", True, 0, 0),            # bad_label
        ("p", "a", "b", True, True, 2, 0),               # out_of_range_id
        ("p", "a", "b", True, True, "first", 0),         # bad_label (id)
        ("p", "same", "same", True, True, 0, 0),         # identical_responses
        ("p", "a", "b", False, True, 0, 0),              # kept, flagged: safer 0 is unsafe
        ("q", "a", "b", True, False, 1, 0),              # kept
        ("q", "b", "a", True, False, 1, 0),              # duplicate_pair (reversed order)
        ("q", " a ", "b", True, False, 0, 0),            # duplicate_pair (after stripping)
    ]
    df = pd.DataFrame(rows, columns=["prompt", "response_0", "response_1", "is_response_0_safe",
                                     "is_response_1_safe", "better_response_id",
                                     "safer_response_id"], dtype=object)
    res = normalize_frame(df)
    assert reasons_of(res) == {0: "null_text", 1: "empty_text", 2: "null_label",
                               3: "bad_label", 4: "out_of_range_id", 5: "bad_label",
                               6: "identical_responses",
                               9: "duplicate_pair", 10: "duplicate_pair"}
    cols = dict(zip(res.rejected["row"], res.rejected["column"], strict=True))
    assert cols[0] == "response_0" and cols[3] == "is_response_0_safe"
    assert cols[4] == "better_response_id"
    values = res.rejected.set_index("row")["value"]
    assert values[3] == "'maybe'" and values[4] == "2" and values[0] is None
    assert res.pairs["prompt"].tolist() == ["p", "q"]
    assert res.pairs["contradiction"].tolist() == [True, False]


def test_report_accounts_for_every_row_and_test_duplicates_of_train() -> None:
    train = pku_rows(response_1=["I can't help.", "I'm sorry, I can't.", "Why did the chicken..."])
    test = pku_rows().iloc[[0, 2]].reset_index(drop=True)  # row 0 is also a train pair
    test["source_row"] = [10, 12]
    tr, te, report = normalize_splits(train, test)
    assert report["train"]["rejected_by_reason"]["identical_responses"] == 1
    assert report["test"]["rejected_by_reason"]["duplicate_of_train"] == 1
    first = test.iloc[0]
    assert report["test"]["rejected_sample"] == [
        {"row": 10, "reason": "duplicate_of_train", "column": None,
         "value": text_hash(first["prompt"], first["response_0"], first["response_1"])}]
    for split, pairs in (("train", tr), ("test", te)):
        r = report[split]
        assert r["rows_in"] == r["rows_out"] + r["rows_rejected"]
        assert r["rows_rejected"] == sum(r["rejected_by_reason"].values())
        assert r["pair_types"] == pair_type_counts(pairs)
        assert set(r["rejected_by_reason"]) == set(REASONS)
    assert len(tr) == 2 and len(te) == 1
    json.dumps(report, allow_nan=False)  # strict JSON as it is


def test_test_pairs_whose_prompt_is_in_train_are_left_out_and_counted() -> None:
    """A test prompt that is also a train prompt, as the text reads (other case, spacing, a
    zero-width space: another `prompt_id`), is left out of the test split, so no test metric
    scores it, and counted; `dataset.allow_seen_test_prompts` keeps it (still counted)."""
    train = pku_rows()
    test = pku_rows(
        prompt=["how do  I bake BREAD?", "How do I pick\u200b a lock?", "Held out", "Held out",
                "Also held out"],
        response_0=["a", "b", "c", "d", "e"], response_1=["f", "g", "h", "i", "j"],
        is_response_0_safe=[True] * 5, is_response_1_safe=[True] * 5,
        better_response_id=[0] * 5, safer_response_id=[0] * 5)
    _, te, report = normalize_splits(train, test)
    assert te["prompt"].tolist() == ["Held out", "Held out", "Also held out"]
    r = report["test"]
    assert r["rejected_by_reason"]["prompt_in_train"] == 2
    assert r["pairs_with_prompt_in_train"] == 2 and r["prompts_in_train"] == 2
    assert r["prompts_in_train_left_out"] is True
    assert r["rows_in"] == 5 == r["rows_out"] + r["rows_rejected"]
    assert {s["row"] for s in r["rejected_sample"]} == {0, 1}
    _, kept, allowed = normalize_splits(train, test, allow_seen_test_prompts=True)
    assert len(kept) == 5 and allowed["test"]["rejected_by_reason"]["prompt_in_train"] == 0
    assert allowed["test"]["prompts_in_train"] == 2
    assert allowed["test"]["prompts_in_train_left_out"] is False


def test_chosen_rejected_layouts() -> None:
    unsafe_style = pd.DataFrame({
        "prompt": ["x", "y", "z"], "chosen": ["c1", "c2", "c3"], "rejected": ["r1", "r2", "r3"],
        "chosen_unsafe": [True, False, True], "rejected_unsafe": [False, False, True],
        "chosen_severity": [2, None, 3],
    })
    res = normalize_frame(unsafe_style)
    assert res.layout == "chosen_rejected"
    p = res.pairs
    assert p["response_0"].tolist() == ["c1", "c2", "c3"]
    assert (p["better_id"] == 0).all()
    # no safer column: the safe side, else the chosen one
    assert p["safer_id"].tolist() == [1, 0, 0]
    assert p["severity_0"].tolist()[0] == 2 and pd.isna(p["severity_0"][1])
    safe_style = pd.DataFrame({
        "prompt": ["x", "y"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"],
        "is_chosen_safe": ["no", "yes"], "is_rejected_safe": ["yes", "yes"],
        "safer": ["rejected", "rejected"],
    })
    res = normalize_frame(safe_style, "chosen_rejected")
    assert res.pairs["unsafe_0"].tolist() == [True, False]
    assert res.pairs["safer_id"].tolist() == [1, 1]
    bad = safe_style.assign(safer=["chosen", "neither"])
    res = normalize_frame(bad)
    assert reasons_of(res) == {1: "bad_label"}
    assert res.pairs["contradiction"].tolist() == [True]


def test_pku_v1_file_through_the_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A PKU-SafeRLHF v1 JSON Lines file, nested harm-category dicts and all."""
    cats = {"Violence": True, "Drugs": False, "Privacy Violation": False}
    rows = []
    for i in range(12):
        unsafe0 = i % 3 == 0
        rows.append({
            "prompt": f"question {i}", "response_0": f"answer a {i}",
            "response_1": f"answer b {i}", "prompt_source": "Alpaca-7B",
            "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca2-7B",
            "is_response_0_safe": not unsafe0, "is_response_1_safe": True,
            "response_0_sha256": "ab" * 32, "response_1_sha256": "cd" * 32,
            "response_0_harm_category": cats if unsafe0 else dict.fromkeys(cats, False),
            "response_1_harm_category": dict.fromkeys(cats, False),
            "response_0_severity_level": 2 if unsafe0 else 0, "response_1_severity_level": 0,
            "better_response_id": 0, "safer_response_id": 1 if unsafe0 else 0,
            "split": "test" if i >= 9 else "train",
        })
    rows[4]["response_1_severity_level"] = 9
    data = tmp_path / "pku_v1.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    params = make_project(tmp_path, monkeypatch, dataset={"name": str(data)})
    assert run_cli(monkeypatch, capsys, "download", "-p", str(params))[0] == 0
    code, out, err = run_cli(monkeypatch, capsys, "normalize", "-p", str(params))
    assert code == 0, err
    table = pq.read_table("data/pairs/train.parquet")
    assert table.schema.equals(PAIRS_SCHEMA)
    train = table.to_pandas()
    report = json.loads(Path("data/pairs/report.json").read_text())
    assert report["train"]["layout"] == "pku_v1"
    assert report["train"]["rows_in"] == 9 and report["train"]["rows_out"] == 8
    assert report["train"]["rejected_sample"] == [
        {"row": 4, "reason": "bad_severity", "column": "response_1_severity_level",
         "value": "9"}]
    assert train.loc[train["prompt"] == "question 0", "severity_0"].item() == 2
    assert train["unsafe_0"].sum() == 3  # train rows 0, 3 and 6
    assert report["source"]["kind"] == "file"
    assert "8 out, 1 rejected" in out


def test_uncoercible_label_is_rejected_and_stage_continues(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.csv"
    pku_rows(is_response_0_safe=["true", "perhaps", "no"]).to_csv(data, index=False)
    params = make_project(tmp_path, monkeypatch,
                          dataset={"name": str(data), "test_fraction": 0.3, "split_seed": 1})
    assert run_cli(monkeypatch, capsys, "download", "-p", str(params))[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "normalize", "-p", str(params))
    assert code == 0, err
    report = json.loads(Path("data/pairs/report.json").read_text())
    sample = report["train"]["rejected_sample"] + report["test"]["rejected_sample"]
    assert {"row": 1, "reason": "bad_label", "column": "is_response_0_safe",
            "value": "'perhaps'"} in sample


def test_layout_detection() -> None:
    assert detect_layout(list(pku_rows().columns)) == "pku30k"
    assert detect_layout([*pku_rows().columns, "response_0_severity_level"]) == "pku_v1"
    assert detect_layout(["prompt", "chosen", "rejected", "is_chosen_safe",
                          "is_rejected_safe"]) == "chosen_rejected"


# --- bad input through the CLI: one line, exit 2 -------------------------------------------------

def _download_then_normalize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str], df: pd.DataFrame,
                             **dataset: object) -> tuple[int, str, str]:
    data = tmp_path / "input.parquet"
    df.assign(split=["train"] * (len(df) - 1) + ["test"]).to_parquet(data)
    params = make_project(tmp_path, monkeypatch, dataset={"name": str(data), **dataset})
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    assert code == 0, err
    return run_cli(monkeypatch, capsys, "normalize", "-p", str(params))


def test_cli_missing_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    df = pku_rows().drop(columns=["safer_response_id"])
    code, _, err = _download_then_normalize(tmp_path, monkeypatch, capsys, df, layout="pku30k")
    assert_one_line_error(code, err, "data/raw/train.parquet", "input.parquet",
                          "missing column(s) ['safer_response_id']", "pku30k")


def test_cli_unknown_layout_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": ["a", "b", "c"], "text": ["x", "y", "z"]})
    code, _, err = _download_then_normalize(tmp_path, monkeypatch, capsys, df)
    assert_one_line_error(code, err, "cannot tell the layout", "input.parquet")


def test_cli_wrong_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    df = pku_rows(response_1=[1, 2, 3])
    code, _, err = _download_then_normalize(tmp_path, monkeypatch, capsys, df)
    assert_one_line_error(code, err, "column 'response_1'", "expected text, got int64")


def test_normalize_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "normalize", "-p", str(params))
    assert_one_line_error(code, err, "data/raw/train.parquet", "file not found")
