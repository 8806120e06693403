"""`compare.run_queue` on a real DVC queue: a line as each experiment starts and ends (its
time, its headline metrics or its log's error line), and the total. The stage is a two-line
script, so that the test times DVC's queue, not the pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from dvc_project import DVC, run

from pipeline import paths
from pipeline.compare import run_queue

STAGE = f'''
import json, pathlib, sys, yaml
delta = yaml.safe_load(open("params.yaml"))["delta"]
if delta == 7:
    print("loading data/x.csv ...")
    sys.exit(print("safedpo: error: data/x.csv: file not found", file=sys.stderr) or 2)
out = pathlib.Path("{paths.EVAL_METRICS}")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({{"harmless_rate": 0.9 + delta / 100, "helpfulness": -delta}}))
'''


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@t"),
                       ("GIT_COMMITTER_NAME", "t"), ("GIT_COMMITTER_EMAIL", "t@t")):
        monkeypatch.setenv(key, value)
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    run([str(DVC), "init", "-q"], tmp_path)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "params.yaml").write_text("delta: 10\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "python stage.py", "deps": ["stage.py"], "params": ["delta"],
        "metrics": [{str(paths.EVAL_METRICS): {"cache": False}}]}}}))
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "base"], tmp_path)
    return tmp_path


def test_run_queue_reports_each_start_and_end(project: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name, delta in (("cmp-a", 2), ("cmp-b", 7)):
        run([str(DVC), "exp", "run", "--queue", "-n", name, "-S", f"delta={delta}"], project)
    run_queue(["cmp-a", "cmp-b"], project)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("compare: ")]
    assert lines[0] == ("compare: running 2 queued experiment(s) one at a time; `dvc queue "
                        "status` lists them, `dvc queue logs NAME` prints one's log")
    assert lines[1] == "compare: cmp-a started (1 of 2)"
    assert re.fullmatch(r"compare: cmp-a done in \d+s: harmless_rate 0\.920, "
                        r"helpfulness -2\.000", lines[2]), lines[2]
    assert lines[3] == "compare: cmp-b started (2 of 2)"
    # The failure's own line from the stage, not DVC's "failed to reproduce".
    assert re.fullmatch(r"compare: cmp-b failed after \d+s: safedpo: error: data/x\.csv: file "
                        r"not found \(`dvc queue logs cmp-b`\)", lines[4]), lines[4]
    assert re.fullmatch(r"compare: 1 of 2 experiment\(s\) succeeded in (\d+m)?\d+s", lines[5])
    assert len(lines) == 6
