"""Helpers for the data-stage tests: a throwaway project folder and an in-process CLI call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 dataset: dict[str, Any] | None = None, toy: dict[str, Any] | None = None
                 ) -> Path:
    """Copy params.yaml into `tmp_path` with `dataset` / `dataset.toy` overrides; chdir there."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"].update(dataset or {})
    params["dataset"]["toy"].update(toy or {"n_train": 200, "n_test": 50})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return path


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str, str]:
    """Run `safedpo ARGS` in this process; returns (exit code, stdout, stderr)."""
    from stages.cli import main

    monkeypatch.setattr(sys, "argv", ["safedpo", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """A user mistake: exit 2 and exactly one line on stderr that names what went wrong."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("safedpo: error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
