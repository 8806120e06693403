"""`safedpo compare` without running DVC: method names, reading `dvc exp show --json`, the table.
(The whole command runs in tests/test_pipeline_sweep.py.)"""

from __future__ import annotations

import math

import pytest

from pipeline.compare import Method, experiment_metrics, methods, table, to_markdown


def _exp(name: str, metrics: dict, state: str = "success", error: bool = False) -> dict:
    rev = {"name": name, "data": {"metrics": {"data/eval/metrics.json": {"data": metrics}}}}
    if error:
        rev["error"] = {"msg": "Experiment run failed", "type": ""}
    return {"name": name, "executor": {"state": state, "local": {"log": f"/logs/{name}.out"}},
            "revs": [rev]}


def test_methods_and_experiment_names() -> None:
    got = methods(["safedpo", "dpo_helpful"], [0.0, 2.5, 10.0])
    assert [m.experiment for m in got] == ["cmp-safedpo-d0", "cmp-safedpo-d2p5",
                                           "cmp-safedpo-d10", "cmp-dpo-helpful"]
    assert got[1].set_params() == ["-S", "train.objective=safedpo", "-S", "delta=2.5"]
    assert got[3].set_params() == ["-S", "train.objective=dpo_helpful"]
    assert got[3].label == "DPO (helpful)" and got[2].label == "SafeDPO (Δ=10)"


def test_a_failed_experiment_is_never_read_as_a_result() -> None:
    """A failed run still shows the baseline's git-tracked metrics; they are not its own."""
    base = {"harmless_rate": 0.9, "harmless_rate_sft": 0.8}
    shown = [{"rev": "abc", "experiments": [
        _exp("cmp-dpo-helpful", {**base, "harmless_rate": 0.5}),
        _exp("cmp-safedpo-d10", base, state="failed", error=True),
        _exp("cmp-dpo-harmless", {}),  # no metrics at all
    ]}]
    ok, failed = experiment_metrics(shown)
    assert set(ok) == {"cmp-dpo-helpful"} and ok["cmp-dpo-helpful"]["harmless_rate"] == 0.5
    assert failed == {"cmp-safedpo-d10": "/logs/cmp-safedpo-d10.out"}


def test_table_has_the_sft_baseline_and_one_row_per_method() -> None:
    """Over-refusal comes from the suite labelled "should be answered", named in the header;
    a test-prompt proxy (`over_refusal_rate`, in metrics.json before 2026-12-07) is ignored."""
    m = {"harmless_rate": 0.99, "helpfulness": 0.4, "win_rate_vs_sft": 0.6,
         "over_refusal_rate": 0.777, "over_refusal_rate_sft": 0.666,
         "suite_orf_over_refusal_rate": 0.3, "suite_orf_over_refusal_rate_sft": 0.2,
         "kl_to_ref": 12.5, "length_stop_rate": 0.25,
         "ref_logp_per_token": -2.5, "ref_logp_per_token_sft": -1.25,
         "pref_accuracy_helpful": 0.7, "pref_accuracy_safety": 1.0, "judge_cost_accuracy": 1.0,
         "judge_reward_accuracy": 0.9, "n_prompts": 200, "harmless_rate_sft": 0.85,
         "helpfulness_sft": 0.3, "length_stop_rate_sft": 0.1}
    chosen = [Method("safedpo", 10.0), Method("dpo_helpful", 0.0)]
    df = table(chosen, {"cmp-safedpo-d10": m, "cmp-dpo-helpful": {**m, "harmless_rate": 0.5}})
    assert df["method"].tolist() == ["SFT", "SafeDPO (Δ=10)", "DPO (helpful)"]
    assert df["harmless_rate"].tolist() == [0.85, 0.99, 0.5]
    assert df["suite_orf_over_refusal_rate"].tolist() == [0.2, 0.3, 0.3]
    assert "over_refusal_rate" not in df.columns
    assert df["delta"].iloc[1] == 10.0 and math.isnan(df["delta"].iloc[2])
    md = to_markdown(df)
    assert ("| method | harmless | helpfulness | win vs SFT | over-refusal (orf suite) | "
            "KL to ref |") in md
    assert "| SafeDPO (Δ=10) | 0.990 | 0.400 | 0.600 | 0.300 | 12.500 | 0.250 | -2.500 | 1.000 |" \
        in md
    assert "| SFT | 0.850 | 0.300 | 0.500 | 0.200 | 0.000 | 0.100 | -1.250 | – |" in md
    assert "0.777" not in md and "0.666" not in md
    # Shown once: the suites' table does not repeat it.
    assert "orf: over refusal rate" not in md
    # With their intervals, as evaluate writes them.
    m.update(harmless_rate_ci_low=0.96, harmless_rate_ci_high=0.997, harmless_rate_sft_ci_low=0.8,
             harmless_rate_sft_ci_high=0.9)
    md = to_markdown(table(chosen, {"cmp-safedpo-d10": m, "cmp-dpo-helpful": m}))
    assert "| SafeDPO (Δ=10) | 0.990 [0.96, 1.00] | 0.400 |" in md
    assert "| SFT | 0.850 [0.80, 0.90] |" in md


def test_report_marks_the_harmless_rate_of_a_suite_out_of_the_judges_distribution() -> None:
    m = {"harmless_rate": 0.99, "helpfulness": 0.4, "win_rate_vs_sft": 0.6,
         "over_refusal_rate": 0.3, "kl_to_ref": 12.5, "length_stop_rate": 0.25,
         "ref_logp_per_token": -2.5, "pref_accuracy_helpful": 0.7, "pref_accuracy_safety": 1.0,
         "judge_cost_accuracy": 1.0, "judge_reward_accuracy": 0.9, "n_prompts": 200}
    for suite, ood, harmless, prefix in (("hb", True, 0.95, 0.125), ("rt", False, 0.5, 0.25)):
        m.update({f"suite_{suite}_harmless_rate": harmless,
                  f"suite_{suite}_harmless_rate_sft": harmless,
                  f"suite_{suite}_refusal_prefix_rate": prefix,
                  f"suite_{suite}_refusal_prefix_rate_sft": prefix,
                  f"suite_{suite}_judge_out_of_distribution": ood})
    md = to_markdown(table([Method("safedpo", 10.0)], {"cmp-safedpo-d10": m}))
    assert ("| method | hb: harmless rate † | hb: refusal prefix rate | rt: harmless rate | "
            "rt: refusal prefix rate |") in md
    assert "| SafeDPO (Δ=10) | 0.950 | 0.125 | 0.500 | 0.250 |" in md
    assert "† Out of the judge's distribution" in md
    m["suite_hb_judge_out_of_distribution"] = False
    assert "†" not in to_markdown(table([Method("safedpo", 10.0)], {"cmp-safedpo-d10": m}))


def test_every_caveat_travels_with_its_number_into_the_report_and_the_table() -> None:
    """The audit's case: "safety pref. acc." 1.000 on one test pair and a judge below chance
    must not read as results: a thin number is marked with its n, the judge line says "below
    the threshold", and results.parquet carries the counts and flags as columns."""
    m = {"harmless_rate": 0.99, "helpfulness": 0.4, "win_rate_vs_sft": 0.6,
         "over_refusal_rate": 0.3, "kl_to_ref": 12.5, "length_stop_rate": 0.25,
         "ref_logp_per_token": -2.5, "pref_accuracy_helpful": 0.7, "pref_accuracy_safety": 1.0,
         "pref_accuracy_safety_n": 1, "pref_accuracy_safety_ci_low": 0.21,
         "pref_accuracy_safety_ci_high": 1.0, "harmless_rate_n": 10, "harmless_rate_sft": 0.8,
         "harmless_rate_sft_n": 10, "judge_cost_accuracy": 0.4,
         "judge_cost_balanced_accuracy": 0.45, "judge_reward_accuracy": 0.6, "n_prompts": 10,
         "judge_below_threshold": True,
         "low_support": "harmless_rate,harmless_rate_sft,pref_accuracy_safety"}
    df = table([Method("safedpo", 10.0)], {"cmp-safedpo-d10": m})
    assert df["low_support"].tolist() == ["harmless_rate", "harmless_rate,pref_accuracy_safety"]
    assert df["pref_accuracy_safety_n"].tolist()[1] == 1 and df["judge_below_threshold"].all()
    md = to_markdown(df)
    assert "| SafeDPO (Δ=10) | 0.990 * n=10 |" in md
    assert "| 1.000 [0.21, 1.00] * n=1 |" in md
    assert "| SFT | 0.800 * n=10 |" in md
    assert ("cost accuracy 0.400 (balanced 0.450) — **below the threshold**: its harmless rates "
            "say little, reward accuracy 0.600") in md
    m.update(judge_below_threshold=False, low_support="")
    md = to_markdown(table([Method("safedpo", 10.0)], {"cmp-safedpo-d10": m}))
    assert "below the threshold" not in md and "| SafeDPO (Δ=10) | 0.990 |" in md


def test_unknown_objective_is_one_line() -> None:
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="not one of"):
        methods(["ppo"], [0.0])


def test_a_profile_overlays_every_experiment_and_is_validated_first(tmp_path) -> None:
    """`--profile gemma3-270m`: its keys become `-S` overrides in Hydra's grammar (strings
    quoted, so `builtin:gemma3-270m` stays one value; the suites list written out), experiments
    and results are named after it, and a wrong key fails before anything is queued."""
    from pathlib import Path

    import yaml

    from pipeline.compare import load_profile
    from pipeline.errors import UserError

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    prof = load_profile("gemma3-270m", params)
    assert prof.name == "gemma3-270m" and prof.results_dir == Path("data/results/gemma3-270m")
    assert "model.name='builtin:gemma3-270m'" in prof.overrides
    assert "sft.lr=2e-05" in prof.overrides
    suites = next(o for o in prof.overrides if o.startswith("suites="))
    assert suites.startswith("suites=[{name:'redteam',source:'builtin:redteam',max_prompts:24},")
    assert suites.endswith("{name:'strongreject',source:'builtin:strongreject',split:'small'}]")
    m = methods(["safedpo"], [10.0], prof)[0]
    assert m.experiment == "gemma3-270m-cmp-safedpo-d10"
    args = m.set_params()
    assert args[-4:] == ["-S", "train.objective=safedpo", "-S", "delta=10"]
    assert args[:2] == ["-S", "model.name='builtin:gemma3-270m'"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lr": 1e-5, "epoch": 2}}))
    with pytest.raises(UserError, match="epoch"):
        load_profile(str(bad), params)
    with pytest.raises(UserError, match="gemma3-270m"):
        load_profile("no-such-profile", params)


def test_experiments_start_from_the_committed_params_whatever_the_workspace_holds(
        tmp_path) -> None:
    """A `dvc exp run -S delta=5` leaves `delta: 5` in params.yaml; compare queues from the
    committed file (each method's values on top) and puts the user's file back after."""
    import subprocess
    from pathlib import Path

    from pipeline.compare import baseline_commit, committed_params, committed_params_text

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True, env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                              "GIT_COMMITTER_NAME": "t",
                                              "GIT_COMMITTER_EMAIL": "t@t", "HOME": "/tmp",
                                              "PATH": "/usr/bin:/bin"}).stdout

    git("init", "-q")
    params = Path(tmp_path) / "params.yaml"
    params.write_text("delta: 10.0\nbeta: 0.1\n")
    git("add", "params.yaml")
    git("commit", "-qm", "baseline")
    assert baseline_commit(tmp_path) == git("rev-parse", "--short", "HEAD").strip()
    params.write_text("delta: 5\nbeta: 0.1\n")
    assert committed_params_text(tmp_path) == "delta: 10.0\nbeta: 0.1\n"
    with committed_params(tmp_path):
        assert params.read_text() == "delta: 10.0\nbeta: 0.1\n"
    assert params.read_text() == "delta: 5\nbeta: 0.1\n"
    with pytest.raises(RuntimeError), committed_params(tmp_path):  # put back on any exit
        raise RuntimeError
    assert params.read_text() == "delta: 5\nbeta: 0.1\n"


def test_an_untracked_local_input_is_refused_before_anything_is_queued(tmp_path) -> None:
    """A local data file or model directory that neither git nor DVC tracks is missing from
    the copies queued experiments run in: compare says so, with the command that fixes it."""
    import subprocess
    from pathlib import Path

    import yaml

    from pipeline.compare import check_inputs_tracked
    from pipeline.errors import UserError

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "HOME": "/tmp", "PATH": "/usr/bin:/bin"}

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, env=env)

    root = Path(tmp_path)
    git("init", "-q")
    (root / "inputs").mkdir()
    (root / "inputs" / "pku.jsonl").write_text('{"prompt": "x"}\n')
    (root / "models" / "llama").mkdir(parents=True)
    (root / "models" / "llama" / "config.json").write_text("{}")
    (root / "params.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": "inputs/pku.jsonl"}, "model": {"name": "models/llama"},
        "judge": {"reward_model": "Owner/hub-model"}}))
    git("add", "params.yaml")
    git("commit", "-qm", "baseline")
    with pytest.raises(UserError, match=r"inputs/pku.jsonl is neither in git nor tracked by "
                                        r"DVC.*`dvc add inputs/pku.jsonl && git add "
                                        r"inputs/pku.jsonl.dvc"):
        check_inputs_tracked(root)
    git("add", "inputs/pku.jsonl")  # a small file: git is enough
    with pytest.raises(UserError, match="models/llama is neither"):
        check_inputs_tracked(root)
    (root / "models" / "llama.dvc").write_text("outs:\n- path: llama\n")
    git("add", "models/llama.dvc")  # as `dvc add models/llama` leaves it
    check_inputs_tracked(root)  # the hub id is not a local path: nothing to track


def test_tradeoff_plot_draws_each_interval_and_marks_thin_points_and_a_weak_judge() -> None:
    """The plot carries the table's caveats: every point's 95% intervals as error bars, a
    point under min_support hollow with its n in the label, a judge below threshold in the
    title."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from pipeline.compare import tradeoff_figure

    df = pd.DataFrame([
        {"method": "SFT", "harmless_rate": 0.8, "harmless_rate_ci_low": 0.7,
         "harmless_rate_ci_high": 0.9, "harmless_rate_n": 200, "helpfulness": -0.5,
         "helpfulness_ci_low": -0.75, "helpfulness_ci_high": -0.2, "helpfulness_n": 200,
         "low_support": "", "judge_below_threshold": True},
        {"method": "SafeDPO (Δ=10)", "harmless_rate": 1.0, "harmless_rate_ci_low": 0.8,
         "harmless_rate_ci_high": 1.0, "harmless_rate_n": 12, "helpfulness": 0.25,
         "helpfulness_ci_low": 0.0, "helpfulness_ci_high": 0.5, "helpfulness_n": 12,
         "low_support": "harmless_rate,kl_to_ref", "judge_below_threshold": True},
    ])
    fig = tradeoff_figure(df)
    ax = fig.axes[0]
    spans = []
    for container in ax.containers:
        xbars, ybars = container.lines[2]
        (x0, y0), (x1, y1) = ybars.get_segments()[0]
        assert x0 == x1
        spans.append((round(y0, 6), round(y1, 6)))
        (x0, _), (x1, _) = xbars.get_segments()[0]
        spans.append((round(x0, 6), round(x1, 6)))
    assert spans == [(0.7, 0.9), (-0.75, -0.2), (0.8, 1.0), (0.0, 0.5)]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["SFT", "SafeDPO (Δ=10) * n=12"]
    faces = [c.lines[0].get_markerfacecolor() for c in ax.containers]
    assert faces[1] == "none" and faces[0] != "none"
    assert "below its accuracy threshold" in ax.get_title()
    plt.close(fig)
