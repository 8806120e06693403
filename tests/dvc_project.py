"""Helpers for the tests that run DVC: a copy of the project in a temporary folder, and a
subprocess call with the venv's entry points on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", ".dvcignore")


def merge(base: dict, over: dict) -> dict:
    """`base` with the nested keys of `over` replaced."""
    return {k: merge(base[k], v) if isinstance(v, dict) else v for k, v in over.items()} | \
        {k: v for k, v in base.items() if k not in over}


def copy_project(dest: Path, params: dict[str, Any] | None = None, git: bool = True) -> Path:
    """The project's code and pipeline (what git tracks, uncommitted edits included) in `dest`,
    with `params` merged into params.yaml; a fresh git repository with one commit if `git`, else
    `dvc init --no-scm`."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if f.startswith(("pipeline/", "stages/", ".dvc/")) or f in PROJECT_FILES:
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    merged = merge(yaml.safe_load((REPO / "params.yaml").read_text()), params or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    if git:
        run(["git", "init", "-q", "-b", "main"], dest)
        run(["git", "add", "-A"], dest)
        run(["git", "commit", "-qm", "test project"], dest)
    else:
        shutil.rmtree(dest / ".dvc", ignore_errors=True)
        run([str(DVC), "init", "--no-scm", "-q"], dest)
    return dest


def run(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    """Run a command in `cwd`; its stdout + stderr (or stdout alone, for JSON), or an
    assertion error with their tails."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "true", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def stages_run(log: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` log says it ran."""
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}
