"""DVC stage `evaluate`: judge generations, implicit-reward accuracy, KL -> data/eval/."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from pipeline import paths
from pipeline.artifacts import read_json, read_parquet, write_json, write_parquet
from pipeline.config import load_params
from pipeline.evaluation import (
    benign_prompt_ids,
    generation_metrics,
    implicit_reward_accuracy,
    kl_to_ref,
    pair_logps,
    sample_logps,
    score_generations,
    win_rate,
)
from pipeline.judges import load_judge
from pipeline.modeling import load_pretrained
from pipeline.reference import fingerprint_for, read_reference


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bs = params.evaluate.batch_size
    test = read_parquet(paths.PAIRS_TEST)
    gens = pd.concat([read_parquet(paths.generations_path(t)) for t in paths.MODEL_TAGS],
                     ignore_index=True)
    judge = load_judge(paths.JUDGE_DIR, params.judge.batch_size)
    judge_info = read_json(paths.JUDGE_DIR / "judge.json")
    scores = score_generations(gens, judge, benign_prompt_ids(test))

    # Implicit reward on the test pairs needs the policy's log-probs and the stored reference
    # ones, which must have been computed by the SFT model on these very pairs.
    max_length = params.train.max_length
    policy, tokenizer = load_pretrained(paths.POLICY_DIR)
    policy.to(device)
    ref_model, ref_tok = load_pretrained(paths.SFT_DIR)
    ref = read_reference(paths.REF_TEST, fingerprint_for(paths.SFT_DIR, ref_tok, max_length, test))
    pref = implicit_reward_accuracy(
        test, pair_logps(policy, tokenizer, test, max_length, bs, device), ref, params.beta)

    # KL to the reference on the policy's own samples: score them under both models.
    mine = scores[scores["model"] == "policy"]
    args = (mine["prompt"].tolist(), mine["response"].tolist(),
            (mine["finish_reason"] == "eos").tolist(), policy.config.max_position_embeddings,
            bs, device)
    lp_pol = sample_logps(policy, tokenizer, *args)
    del policy
    ref_model.to(device)
    lp_ref = sample_logps(ref_model, ref_tok, *args)
    scores.loc[mine.index, "logp_policy"] = lp_pol
    scores.loc[mine.index, "logp_ref"] = lp_ref

    pol, sft = generation_metrics(scores, "policy"), generation_metrics(scores, "sft")
    metrics = {
        "harmless_rate": pol["harmless_rate"], "harmless_rate_sft": sft["harmless_rate"],
        "helpfulness": pol["helpfulness"], "helpfulness_sft": sft["helpfulness"],
        "win_rate_vs_sft": win_rate(scores),
        "over_refusal_rate": pol["over_refusal_rate"],
        "over_refusal_rate_sft": sft["over_refusal_rate"],
        **pref,
        "kl_to_ref": kl_to_ref(lp_pol, lp_ref),
        "judge_cost_accuracy": judge_info.get("cost_accuracy"),
        "judge_reward_accuracy": judge_info.get("reward_accuracy"),
        "n_prompts": int(scores["prompt_id"].nunique()),
    }
    write_parquet(scores, paths.EVAL_SCORES)
    write_json(metrics, paths.EVAL_METRICS)
    write_json([{"model": tag, "helpfulness": m["helpfulness"],
                 "harmless_rate": m["harmless_rate"]}
                for tag, m in (("sft", sft), ("policy", pol))],
               paths.EVAL_PLOTS / "tradeoff.json")
    print(f"evaluate: harmless {metrics['harmless_rate']:.3f} (sft "
          f"{metrics['harmless_rate_sft']:.3f}), helpfulness {metrics['helpfulness']:.3f} (sft "
          f"{metrics['helpfulness_sft']:.3f}), win vs sft {metrics['win_rate_vs_sft']:.3f}, "
          f"over-refusal {metrics['over_refusal_rate']:.3f}; judge accuracy cost "
          f"{metrics['judge_cost_accuracy']}, reward {metrics['judge_reward_accuracy']} "
          f"[{time.perf_counter() - t0:.1f}s]")
