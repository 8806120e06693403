"""`safedpo inspect`: schema, counts, statistics and first rows of any Parquet artifact."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from data_cli import assert_one_line_error, run_cli

from pipeline.artifacts import write_parquet
from pipeline.config import ToyConfig
from pipeline.errors import UserError
from pipeline.inspect import describe
from pipeline.normalize import PAIRS_SCHEMA, normalize_frame
from pipeline.toydata import generate


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    train, _ = generate(ToyConfig(n_train=60, n_test=5, seed=2))
    pairs = normalize_frame(train).pairs
    path = tmp_path / "pairs.parquet"
    write_parquet(pairs, path, schema=PAIRS_SCHEMA)
    return path


def test_describe_pairs(pairs_file: Path) -> None:
    text = describe(pairs_file, rows=3)
    assert text.splitlines()[0] == f"{pairs_file}: 60 rows x 14 columns"
    assert "  better_id      int8" in text and "  unsafe_0       bool" in text
    stats = text.split("statistics:")[1].split("first 3 rows:")[0]
    pair_id_line = next(ln for ln in stats.splitlines() if ln.strip().startswith("pair_id"))
    assert pair_id_line.split()[1:3] == ["0", "60"]  # no nulls, all distinct
    assert "mean length 16.0" in pair_id_line
    assert "all null" in stats  # the toy set has no severities
    assert "0: " in next(ln for ln in stats.splitlines() if "better_id" in ln)
    head = text.split("first 3 rows:")[1]
    assert len(head.strip().splitlines()) == 4  # header + 3 rows
    assert "..." in head  # long strings are shortened


def test_describe_nested_and_empty(tmp_path: Path) -> None:
    df = pd.DataFrame({"harm": [{"Violence": True, "Drugs": False}, None,
                                {"Violence": True, "Drugs": False}],
                       "severity": pd.array([1, None, 3], dtype="Int8"),
                       "score": [0.5, 1.5, None]})
    path = tmp_path / "nested.parquet"
    write_parquet(df, path)
    text = describe(path, rows=0)
    assert "  harm      struct<Violence: bool, Drugs: bool>" in text
    stats = text.split("statistics:")[1]
    harm_line = next(ln for ln in stats.splitlines() if ln.strip().startswith("harm "))
    assert harm_line.split()[1:3] == ["1", "1"]  # 1 null, 1 distinct dict
    assert "first" not in text  # rows=0 shows no table
    empty = tmp_path / "empty.parquet"
    write_parquet(df.iloc[0:0], empty)
    assert "0 rows x 3 columns" in describe(empty)


def test_describe_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        describe(tmp_path / "missing.parquet")
    with pytest.raises(UserError, match="is a folder"):
        describe(tmp_path)
    bad = tmp_path / "notes.parquet"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        describe(bad)
    with pytest.raises(UserError, match="--rows must be >= 0"):
        describe(bad, rows=-1)


def test_cli_inspect(pairs_file: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(pairs_file), "-n", "2")
    assert code == 0, err
    assert "60 rows x 14 columns" in out and "first 2 rows:" in out


def test_cli_inspect_not_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\n")
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(path))
    assert_one_line_error(code, err, "params.yaml", "not a readable Parquet file")
