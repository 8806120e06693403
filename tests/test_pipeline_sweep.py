"""The whole DVC pipeline on a tiny configuration, then a Δ sweep with `dvc exp`.

This is the end-to-end test: `dvc repro` runs every stage in a fresh git repository holding a
copy of the project; `dvc exp run -S delta=0` then reruns only what depends on Δ, and queued
runs (`--queue -S delta=0,2` + `--run-all`) show up in `dvc exp show` with their metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from dvc_project import BIN, copy_project, run, stages_run

pytestmark = pytest.mark.slow

UPSTREAM = {"download", "normalize", "sft", "ref_logps", "judge", "generate@sft"}
# always_changed: they write the data source's key and the suites' prompts, the same bytes if
# nothing changed.
ALWAYS = {"source", "suites"}
DOWNSTREAM = {"train", "generate@policy", "evaluate"}

TINY_PARAMS = {
    "dataset": {"toy": {"n_train": 96, "n_test": 32}},
    "model": {"tiny": {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
                       "num_layers": 1, "num_heads": 2, "num_kv_heads": 2}},
    "sft": {"epochs": 1, "batch_size": 16, "max_length": 96},
    "train": {"epochs": 1, "batch_size": 16, "max_length": 96, "checkpoint_every": 4},
    "generate": {"n_prompts": 8, "max_new_tokens": 12, "batch_size": 8},
    "judge": {"offline": {"epochs": 2, "n_features": 4096}},
    "suites": [{"name": "redteam", "source": "builtin:redteam", "max_prompts": 12},
               {"name": "overrefusal", "source": "builtin:overrefusal", "max_prompts": 6},
               {"name": "harmbench", "source": "builtin:harmbench", "max_prompts": 6}],
    "theory": {"n_prompts": 3, "n_responses": 4, "n_pairs": 600, "steps": 300,
               "deltas": [0.0, 10.0]},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("clone"), TINY_PARAMS)


def test_repro_runs_every_stage_then_a_delta_change_reruns_only_downstream(
        project: Path) -> None:
    log = run([str(BIN / "dvc"), "repro"], project)
    assert stages_run(log) == ALWAYS | UPSTREAM | DOWNSTREAM | {"theory"}
    metrics = json.loads((project / "data/eval/metrics.json").read_text())
    for key in ("harmless_rate", "harmless_rate_sft", "helpfulness", "helpfulness_sft",
                "win_rate_vs_sft", "suite_overrefusal_over_refusal_rate", "pref_accuracy_helpful",
                "pref_accuracy_safety", "kl_to_ref", "judge_cost_accuracy",
                "judge_reward_accuracy", "n_prompts"):
        assert key in metrics, key
    assert metrics["n_prompts"] == 8
    # Over-refusal only on prompts labelled "should be answered": no test-prompt proxy.
    assert not any(k.startswith("over_refusal") for k in metrics)
    # The toy test tasks are held out: no test prompt occurs in train, and the log says so.
    assert metrics["test_prompts_in_train_left_out"] == 0
    assert metrics["test_prompts_in_train_scored"] == 0
    assert ("evaluate: 0 test prompts (0 pairs) also occur in train and are left out of every "
            "test metric") in log
    assert 0.0 <= metrics["harmless_rate"] <= 1.0
    # The held-out suites are reported beside the test prompts, with their support.
    assert metrics["suite_redteam_harmless_rate_n"] == 12
    assert metrics["suite_overrefusal_over_refusal_rate_n"] == 6
    assert 0.0 <= metrics["suite_overrefusal_over_refusal_rate_sft"] <= 1.0
    assert "suite_redteam_harmless_rate" in metrics["low_support"]
    # A shipped standard suite: the literature's refusal rule beside the judge, whose harmless
    # rate there is flagged out of its distribution (the judge knows the toy data only).
    assert metrics["suite_harmbench_refusal_prefix_rate_n"] == 6
    assert metrics["suite_harmbench_judge_out_of_distribution"] is True
    assert metrics["suite_redteam_judge_out_of_distribution"] is False
    assert metrics["judge_out_of_distribution"] == "harmbench"
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)

    # Changing Δ: a dry run would start at `train` and leave every upstream stage cached ...
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["delta"] = 5.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = stages_run(run([str(BIN / "dvc"), "repro", "--dry"], project))
    assert "train" in dry and not dry & UPSTREAM, dry
    run(["git", "checkout", "params.yaml"], project)

    # ... and `dvc exp run -S delta=0`, verbatim, runs only those.
    exp = run([str(BIN / "dvc"), "exp", "run", "-S", "delta=0"], project)
    assert stages_run(exp) == ALWAYS | DOWNSTREAM, exp[-2000:]


def test_compare_runs_one_experiment_per_method_and_reuses_them(project: Path) -> None:
    """`safedpo compare` queues a named DVC experiment per method, tabulates their metrics from
    `dvc exp show --json`, and a second call queues and runs nothing."""
    args = [str(BIN / "safedpo"), "compare", "-o", "safedpo", "-o", "dpo_helpful",
            "-d", "0", "-d", "2"]
    out = run(args, project)
    assert out.count("compare: queued") == 3 and "3 experiment(s) run, 0 reused" in out
    # Progress: each experiment's start and end (with its headline metrics), then the total.
    for name in ("cmp-safedpo-d0", "cmp-safedpo-d2", "cmp-dpo-helpful"):
        assert f"compare: {name} started (" in out
        assert re.search(rf"compare: {name} done in (\d+m)?\d+s: harmless_rate \d\.\d{{3}}, "
                         r"helpfulness -?\d+\.\d{3}", out), out[-3000:]
    assert re.search(r"compare: 3 of 3 experiment\(s\) succeeded in (\d+m)?\d+s", out)
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], project, stdout_only=True))
    deltas = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("data/eval/metrics.json", {}).get("data")
                if metrics and params["train"]["objective"] == "safedpo":
                    deltas[params.get("delta")] = metrics
    assert {0, 2} <= set(deltas), deltas.keys()
    # Each experiment has metrics of its own (a failed one would show the baseline's).
    assert deltas[0]["kl_to_ref"] != deltas[2]["kl_to_ref"]
    table = (project / "data/results/results.md").read_text()
    for label in ("| SFT |", "| SafeDPO (Δ=0) |", "| SafeDPO (Δ=2) |", "| DPO (helpful) |",
                  "| over-refusal (overrefusal suite) |"):
        assert label in table, table
    again = run(args, project)
    assert "compare: queued" not in again and "0 experiment(s) run, 3 reused" in again
