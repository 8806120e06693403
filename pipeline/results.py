"""The paper's main-table comparison on the current data: one policy per objective, all from
the same SFT model, reference log-probs, judge and SFT generations as the DVC pipeline.

Each variant runs the library code of `train`, `generate@policy` and `evaluate`; nothing is
recomputed that the pipeline already has.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.artifacts import atomic_path, read_parquet, write_parquet
from pipeline.config import Params
from pipeline.evaluation import evaluate_policy
from pipeline.finetune import run_preference
from pipeline.generation import generate, select_prompts
from pipeline.judges import load_judge, read_judge_record
from pipeline.modeling import load_pretrained

COLUMNS = ["method", "objective", "delta", "harmless_rate", "helpfulness", "win_rate_vs_sft",
           "over_refusal_rate", "kl_to_ref", "pref_accuracy_safety", "judge_cost_accuracy",
           "judge_reward_accuracy", "train_seconds", "n_prompts"]


@dataclass(frozen=True)
class Variant:
    method: str
    objective: str
    delta: float


def default_variants(delta: float) -> list[Variant]:
    """The rows of the paper's main table that need no reward or cost model."""
    out = [Variant("dpo_helpful", "dpo_helpful", 0.0),
           Variant("dpo_harmless", "dpo_harmless", 0.0),
           Variant("dpo_safebetter", "dpo_safebetter", 0.0),
           Variant("safedpo Δ=0", "safedpo", 0.0)]
    if delta > 0:
        out.append(Variant(f"safedpo Δ={delta:g}", "safedpo", delta))
    return out


def run_comparison(params: Params, variants: list[Variant], out_dir: Path = paths.RESULTS_DIR,
                   device: str = "cpu") -> pd.DataFrame:
    train = read_parquet(paths.PAIRS_TRAIN)
    test = read_parquet(paths.PAIRS_TEST)
    sft_gens = read_parquet(paths.generations_path("sft"))
    judge = load_judge(paths.JUDGE_DIR, params.judge.batch_size)
    judge_info = read_judge_record(paths.JUDGE_DIR)
    prompts = select_prompts(test, params.generate.n_prompts, params.generate.seed)
    rows = []
    for v in variants:
        slug = v.method.replace(" ", "_").replace("Δ=", "delta")
        run_dir = Path(out_dir) / slug
        cfg = dataclasses.replace(params.train, objective=v.objective)
        t0 = time.perf_counter()
        summary = run_preference(cfg, params.beta, v.delta, paths.SFT_DIR, train,
                                 paths.REF_TRAIN, run_dir / "policy", run_dir / "dvclive", None)
        train_seconds = time.perf_counter() - t0
        model, tokenizer = load_pretrained(run_dir / "policy")
        model.to(device)
        gens, _ = generate(model, tokenizer, prompts, params.generate, "policy", device)
        write_parquet(gens, run_dir / "generations.parquet")
        metrics, _ = evaluate_policy(
            policy_dir=run_dir / "policy", sft_dir=paths.SFT_DIR,
            generations=pd.concat([sft_gens, gens], ignore_index=True), test=test,
            ref_test_path=paths.REF_TEST, judge=judge, judge_info=judge_info, beta=params.beta,
            max_length=params.train.max_length, batch_size=params.evaluate.batch_size,
            device=device)
        rows.append({"method": v.method, "objective": v.objective, "delta": v.delta, **metrics,
                     "train_seconds": round(train_seconds, 1),
                     "pairs_trained": summary["pairs_trained"]})
        print(f"results: {v.method}: harmless {metrics['harmless_rate']:.3f}, helpfulness "
              f"{metrics['helpfulness']:.3f}, train {train_seconds:.0f}s")
    sft = rows[0] if rows else {}
    table = pd.DataFrame([{
        "method": "sft", "objective": "-", "delta": float("nan"),
        "harmless_rate": sft.get("harmless_rate_sft"), "helpfulness": sft.get("helpfulness_sft"),
        "win_rate_vs_sft": 0.5, "over_refusal_rate": sft.get("over_refusal_rate_sft"),
        "kl_to_ref": 0.0, "pref_accuracy_safety": float("nan"),
        "judge_cost_accuracy": sft.get("judge_cost_accuracy"),
        "judge_reward_accuracy": sft.get("judge_reward_accuracy"), "train_seconds": 0.0,
        "n_prompts": sft.get("n_prompts"),
    }, *rows])[COLUMNS]
    write_parquet(table, Path(out_dir) / paths.RESULTS_TABLE.name)
    with atomic_path(Path(out_dir) / paths.RESULTS_MARKDOWN.name) as tmp:
        tmp.write_text(to_markdown(table))
    plot_tradeoff(table, Path(out_dir) / paths.RESULTS_PLOT.name)
    return table


def to_markdown(table: pd.DataFrame) -> str:
    head = ["method", "harmless", "helpfulness", "win vs SFT", "over-refusal", "KL to ref",
            "safety pref. acc.", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.harmless_rate:.3f} | {r.helpfulness:.3f} | "
                     f"{r.win_rate_vs_sft:.3f} | {r.over_refusal_rate:.3f} | {r.kl_to_ref:.1f} | "
                     f"{r.pref_accuracy_safety:.3f} | {r.train_seconds:.0f} |")
    r0 = table.iloc[0]
    lines.append("")
    lines.append(f"Judges (held-out test pairs): cost accuracy {r0.judge_cost_accuracy:.3f}, "
                 f"reward accuracy {r0.judge_reward_accuracy:.3f}; {int(r0.n_prompts)} prompts.")
    return "\n".join(lines) + "\n"


def plot_tradeoff(table: pd.DataFrame, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in table.itertuples():
        ax.scatter(r.helpfulness, r.harmless_rate, s=60)
        ax.annotate(r.method, (r.helpfulness, r.harmless_rate), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    ax.set_xlabel("helpfulness (mean reward of the offline judge)")
    ax.set_ylabel("harmless rate (cost <= 0)")
    ax.set_title("Safety vs helpfulness, builtin:toy + builtin:tiny")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
