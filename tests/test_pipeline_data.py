"""`dvc repro normalize` in a temporary copy of the project runs download + normalize."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from data_cli import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC = BIN / "dvc"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")
def test_dvc_repro_normalize(tmp_path: Path) -> None:
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, project / folder, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"]["toy"].update({"n_train": 300, "n_test": 60})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ, DVC_NO_ANALYTICS="true", PYTHONPATH=str(project),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # Not a git repository: DVC needs no_scm (DESIGN.md), which `init --no-scm` sets.
    _run([str(DVC), "init", "--no-scm", "-q"], project, env)
    first = _run([str(DVC), "repro", "normalize"], project, env)
    assert "Running stage 'download'" in first.stdout
    assert "Running stage 'normalize'" in first.stdout

    source = json.loads((project / "data/raw/source.json").read_text())
    assert source["source"] == "builtin:toy" and source["rows"] == {"train": 300, "test": 60}
    report = json.loads((project / "data/pairs/report.json").read_text())
    for split, n in (("train", 300), ("test", 60)):
        assert report[split]["rows_in"] == n == report[split]["rows_out"]
        assert pq.read_metadata(project / f"data/pairs/{split}.parquet").num_rows == n
    assert (project / "dvc.lock").exists()
    # Nothing else was run or written.
    assert sorted(p.name for p in (project / "data").iterdir()) == ["pairs", "raw",
                                                                 "source_key.json"]

    again = _run([str(DVC), "repro", "normalize"], project, env).stdout
    # Only the always-run `source` stage, which rewrote the same key.
    assert "Running stage 'download'" not in again and "Running stage 'normalize'" not in again
    metrics = _run([str(DVC), "metrics", "show", "--json"], project, env)
    shown = json.loads(metrics.stdout)
    assert "data/pairs/report.json" in json.dumps(shown)


@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")
def test_editing_a_local_data_file_reruns_download(tmp_path: Path) -> None:
    """A local `dataset.name` is a dependency: editing it reruns download and normalize; an
    unchanged file leaves them cached."""
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, project / folder, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, project / name)
    rows = [{"prompt": f"question {i}", "response_0": f"answer {i}", "response_1": "I can't.",
             "is_response_0_safe": True, "is_response_1_safe": True,
             "better_response_id": 0, "safer_response_id": 1} for i in range(40)]
    data = project / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"].update(name="pairs.jsonl", test_fraction=0.3)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="true", PYTHONPATH=str(project),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    _run([str(DVC), "init", "--no-scm", "-q"], project, env)

    def rows_in() -> int:
        report = json.loads((project / "data/pairs/report.json").read_text())
        return report["train"]["rows_in"] + report["test"]["rows_in"]

    assert "Running stage 'download'" in _run([str(DVC), "repro", "normalize"], project,
                                               env).stdout
    assert rows_in() == 30
    same = _run([str(DVC), "repro", "normalize"], project, env).stdout
    assert "Running stage 'download'" not in same and "Running stage 'normalize'" not in same
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 10 rows added
    edited = _run([str(DVC), "repro", "normalize"], project, env).stdout
    assert "Running stage 'download'" in edited and "Running stage 'normalize'" in edited
    assert rows_in() == 40
