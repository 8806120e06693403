"""DVC stage `evaluate`: judge generations, implicit-reward accuracy, KL -> data/eval/."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.artifacts import read_json, read_parquet, write_json, write_parquet
from pipeline.config import load_params
from pipeline.evaluation import (
    evaluate_policy,
    seen_in_train,
    suite_lines,
    tradeoff_points,
    warnings_for,
)
from pipeline.generation import GENERATION_COLUMNS
from pipeline.judge_kinds import load_judge
from pipeline.judges import read_judge_record
from pipeline.precision import device, weight_dtype
from pipeline.suites import SUITE_COLUMNS, TEST_SUITE
from pipeline.support import share


def kl_text(metrics: dict[str, object]) -> str:
    if metrics.get("kl_to_ref") is None:
        return f"no KL (biased sampling; mean log-ratio {metrics.get('sampled_logratio'):.2f})"
    return f"KL to ref {metrics['kl_to_ref']:.2f}"


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    t0 = time.perf_counter()
    gens = pd.concat([read_parquet(paths.generations_path(t), GENERATION_COLUMNS)
                      for t in paths.MODEL_TAGS], ignore_index=True)
    test = read_parquet(paths.PAIRS_TEST)
    suites = read_parquet(paths.SUITES_PROMPTS, SUITE_COLUMNS)
    # Where each suite's prompts come from, against the data the judge was trained and
    # measured on: a suite from elsewhere is out of the judge's distribution.
    domains = {name: rec["domain"] for name, rec in read_json(paths.SUITES_RECORD).items()}
    metrics, scores, category_rows = evaluate_policy(
        policy_dir=paths.POLICY_DIR, sft_dir=paths.SFT_DIR, generations=gens,
        test=test, suites=suites, suite_domains=domains, judge_domain=params.dataset.name.strip(),
        ref_test_path=paths.REF_TEST,
        judge=partial(load_judge, paths.JUDGE_DIR, params.judge.batch_size),
        judge_info=read_judge_record(paths.JUDGE_DIR), beta=params.beta,
        max_length=params.train.max_length, cfg=params.evaluate,
        mixed_precision=params.train.mixed_precision, dtype=weight_dtype(params.model.dtype),
        device=device(), unbiased_sampling=params.generate.unbiased)
    # Normalize left the test pairs whose prompt is in train out of the test split (or kept
    # them, if allowed); the count travels with the metrics.
    overlap = read_json(paths.PAIRS_REPORT)["test"]
    metrics.update(seen_in_train(overlap))
    write_parquet(scores, paths.EVAL_SCORES)
    write_json(metrics, paths.EVAL_METRICS)
    write_json(tradeoff_points(metrics), paths.EVAL_TRADEOFF)
    # One point per (category, model); empty on data without harm categories.
    write_json(category_rows, paths.EVAL_CATEGORIES)
    # Counted on the generations: with several samples per prompt, `_n` counts prompts.
    mine = scores[(scores["model"] == "policy") & (scores["suite"] == TEST_SUITE)]
    stopped = share(int((mine["finish_reason"] == "length").sum()), len(mine))
    # Over-refusal exists only where prompts are labelled "should be answered": the suites'.
    over = "".join(f"over-refusal ({s} suite) {metrics[k]:.3f}, "
                   for s in sorted(suites["suite"].unique())
                   if (k := f"suite_{s}_over_refusal_rate") in metrics)
    print(f"evaluate: harmless {metrics['harmless_rate']:.3f} (sft "
          f"{metrics['harmless_rate_sft']:.3f}), helpfulness {metrics['helpfulness']:.3f} (sft "
          f"{metrics['helpfulness_sft']:.3f}), win vs sft {metrics['win_rate_vs_sft']:.3f}, "
          f"{over}{kl_text(metrics)} "
          f"({stopped} samples hit max_new_tokens); judge accuracy cost "
          f"{metrics['judge_cost_accuracy']:.3f}, reward {metrics['judge_reward_accuracy']:.3f} "
          f"[{time.perf_counter() - t0:.1f}s]")
    print(f"evaluate: harmless {metrics['harmless_rate']:.3f} "
          f"[{metrics['harmless_rate_ci_low']:.3f}, {metrics['harmless_rate_ci_high']:.3f}] on "
          f"{len(mine)} generations of {metrics['harmless_rate_n']} prompts; helpfulness "
          f"{metrics['helpfulness']:.3f} "
          f"[{metrics['helpfulness_ci_low']:.3f}, {metrics['helpfulness_ci_high']:.3f}] on "
          f"{metrics['helpfulness_n']} prompts (95% intervals)")
    if not metrics["test_prompts_in_train_scored"]:
        print(f"evaluate: {metrics['test_prompts_in_train_left_out']} test prompts "
              f"({overlap.get('pairs_with_prompt_in_train', 0)} pairs) also occur in train "
              "and are left out of every test metric (normalize: prompt_in_train)")
    for line in suite_lines(metrics, sorted(suites["suite"].unique())):
        print(f"evaluate: {line}")
    for line in warnings_for(metrics, params.evaluate):
        print(f"evaluate: {line}")
