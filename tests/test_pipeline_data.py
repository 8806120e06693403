"""`dvc repro normalize` in a temporary copy of the project (no git): download + normalize, and
an edited local data file reruns them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dvc_project import BIN, DVC, copy_project, run, stages_run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed here")]


def test_dvc_repro_normalize(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project",
                           {"dataset": {"toy": {"n_train": 300, "n_test": 60}}}, git=False)
    first = run([str(DVC), "repro", "normalize"], project)
    assert stages_run(first) == {"source", "download", "normalize"}

    source = json.loads((project / "data/raw/source.json").read_text())
    assert source["source"] == "builtin:toy" and source["rows"] == {"train": 300, "test": 60}
    report = json.loads((project / "data/pairs/report.json").read_text())
    for split, n in (("train", 300), ("test", 60)):
        assert report[split]["rows_in"] == n == report[split]["rows_out"]
        assert pq.read_metadata(project / f"data/pairs/{split}.parquet").num_rows == n
    assert (project / "dvc.lock").exists()
    # Nothing else was run or written.
    assert sorted(p.name for p in (project / "data").iterdir()) == [
        "model_key.json", "pairs", "raw", "source_key.json"]
    # Only the always-run `source` stage, which rewrote the same key.
    assert stages_run(run([str(DVC), "repro", "normalize"], project)) == {"source"}
    shown = json.loads(run([str(DVC), "metrics", "show", "--json"], project, stdout_only=True))
    assert "data/pairs/report.json" in json.dumps(shown)


def test_editing_a_local_data_file_reruns_download(tmp_path: Path) -> None:
    """A local `dataset.name` is a dependency: editing it reruns download and normalize; an
    unchanged file leaves them cached."""
    rows = [{"prompt": f"question {i}", "response_0": f"answer {i}", "response_1": "I can't.",
             "is_response_0_safe": True, "is_response_1_safe": True,
             "better_response_id": 0, "safer_response_id": 1} for i in range(40)]
    project = copy_project(tmp_path / "project",
                           {"dataset": {"name": "pairs.jsonl", "test_fraction": 0.3}}, git=False)
    data = project / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))

    def rows_in() -> int:
        report = json.loads((project / "data/pairs/report.json").read_text())
        return report["train"]["rows_in"] + report["test"]["rows_in"]

    assert "download" in stages_run(run([str(DVC), "repro", "normalize"], project))
    assert rows_in() == 30
    assert stages_run(run([str(DVC), "repro", "normalize"], project)) == {"source"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 10 rows added
    assert stages_run(run([str(DVC), "repro", "normalize"], project)) == {
        "source", "download", "normalize"}
    assert rows_in() == 40

    # An edit in place: plain `dvc status` cannot see it (the key is computed by the
    # always-run `source` stage); `safedpo status` computes the keys first, then asks DVC.
    data.write_text(data.read_text().replace("question 3\"", "question three\""))
    assert "download" not in run([str(DVC), "status"], project)
    status = run([str(BIN / "safedpo"), "status"], project)
    assert "download:" in status and "modified:" in status and "data/source_key.json" in status
    unchanged = run([str(BIN / "safedpo"), "status", "download"], project)
    assert "data/source_key.json" in unchanged  # still stale: status itself reruns nothing
    assert stages_run(run([str(DVC), "repro", "normalize"], project)) == {
        "source", "download", "normalize"}
    assert "download" not in run([str(BIN / "safedpo"), "status"], project)
