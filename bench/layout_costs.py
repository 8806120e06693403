"""What each forward layout costs on this device, and the attention factor that the layout
choice (`layouts.row_cost`, `logps.forward_layout`) uses for it.

On the same micro-batches of pairs, forward + backward of the summed log-probs
(`logps.batch_logps`, what a training step runs) is timed in every layout: padded in 1, 2, 4 and
8 length groups, packed, and packed with shared prompts. Each run is described by what the FLOP
model counts: tokens (rows × width over its forward passes) and query-key pairs (rows × width²,
attention being computed over whole rows under a mask). A least-squares fit of

    seconds ≈ c_tok · tokens + c_pair · pairs + c_fwd · forward passes

gives the measured attention factor κ = (c_pair / c_tok) / `attention_cost(model)` (how many
times its FLOP share attention really costs here) and the cost of one more forward pass in
tokens, c_fwd / c_tok (what `layouts.PASS_COST` stands for). The report then shows, per batch,
which layout was fastest and which `auto` (`layouts.cheapest`, the CPU default) runs.

    python bench/layout_costs.py                          # tiny + 30m, toy + pku data, CPU
    python bench/layout_costs.py --config 30m --data pku --batch-size 8 --batches 2
    python bench/layout_costs.py --json costs.json

bench/bench_train.py builds the models and data (`--data pku`: long PKU-SafeRLHF-shaped pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_train import CONFIGS, DATA, DEFAULT_MAX_LENGTH, bench_pairs, build

from pipeline.layouts import cheapest, collate, layout_of, length_groups, pack
from pipeline.logps import attention_cost, batch_logps

LAYOUTS = ("padded1", "padded2", "padded4", "padded8", "packed", "shared")


@dataclass
class Run:
    batch: int
    layout: str
    seconds: float
    tokens: int
    pairs: int
    forwards: int
    shapes: list[tuple[int, int]]


def layout_batch(layout: str, seqs: list, pad_id: int, attn: float
                 ) -> tuple[dict[str, torch.Tensor], int, list[tuple[int, int]]]:
    """(batch, groups, [(rows, width) of each forward pass])."""
    if layout.startswith("padded"):
        groups = int(layout.removeprefix("padded"))
        parts = length_groups([len(e.input_ids) for e in seqs], groups)
        return collate(seqs, pad_id), groups, [(len(p), int(p.max())) for p in parts]
    batch = pack(seqs, pad_id, layout == "shared", attn)
    return batch, 1, [tuple(batch["input_ids"].shape)]


def time_layout(model: torch.nn.Module, batch: dict[str, torch.Tensor], groups: int,
                reps: int) -> float:
    weights = None
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        lp, _ = batch_logps(model, batch, groups)
        if weights is None:
            weights = torch.linspace(-1, 1, len(lp))
        (lp * weights).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def measure(config: str, data: str, batch_size: int, n_batches: int, reps: int,
            max_length: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, tokenizer, examples = build(config, data, bench_pairs(data, 400), max_length, seed=0)
    attn = attention_cost(model)
    rng = np.random.default_rng(0)
    runs: list[Run] = []
    batches = []
    for b in range(n_batches):
        pick = rng.choice(len(examples), size=batch_size, replace=False)
        seqs = [examples[i].chosen for i in pick] + [examples[i].rejected for i in pick]
        batches.append(seqs)
        for layout in LAYOUTS:
            batch, groups, shapes = layout_batch(layout, seqs, tokenizer.pad_token_id, attn)
            seconds = time_layout(model, batch, groups, reps)
            runs.append(Run(b, layout, seconds, sum(r * w for r, w in shapes),
                            sum(r * w * w for r, w in shapes), len(shapes), shapes))
            print(f"{config} {data} batch {b} {layout:8s} {seconds:7.3f} s  shapes {shapes}",
                  flush=True)
    x = np.array([[r.tokens, r.pairs, r.forwards] for r in runs], dtype=np.float64)
    y = np.array([r.seconds for r in runs])
    # Least squares on relative error: each run weighs alike whatever its duration.
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    c_tok, c_pair, c_fwd = (float(c) for c in coef)
    kappa = c_pair / c_tok / attn
    picks = []
    for b in range(n_batches):
        mine = {r.layout: r for r in runs if r.batch == b}
        fastest = min(mine.values(), key=lambda r: r.seconds)
        # What `auto` (`layouts.cheapest`, 4 groups as on CPU) runs for this batch.
        seqs = batches[b]
        got = cheapest(seqs, tokenizer.pad_token_id, 4, attn)
        auto = {"padded": "padded4", "packed": "packed", "shared_prompts": "shared"}[layout_of(got)]
        picks.append({"batch": b, "auto": auto, "fastest": fastest.layout,
                      "auto_over_fastest": mine[auto].seconds / fastest.seconds,
                      "auto_over_padded4": mine[auto].seconds / mine["padded4"].seconds})
    return {"config": config, "data": data, "batch_size": batch_size,
            "attention_cost": attn, "c_tok_ns": c_tok * 1e9, "c_pair_ns": c_pair * 1e9,
            "c_fwd_ms": c_fwd * 1e3, "kappa": kappa, "pass_tokens": c_fwd / c_tok,
            "fit_max_rel_err": float(np.max(np.abs(x @ coef - y) / y)),
            "runs": [r.__dict__ for r in runs], "picks": picks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    ap.add_argument("--data", choices=[*DATA, "both"], default="both")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="pairs per batch (default: 32 tiny, 8 30m)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = ["tiny", "30m"] if args.config == "both" else [args.config]
    datas = list(DATA) if args.data == "both" else [args.data]
    results = []
    for config in configs:
        for data in datas:
            batch = args.batch_size or (32 if config == "tiny" else 8)
            results.append(measure(config, data, batch, args.batches, args.reps,
                                   DEFAULT_MAX_LENGTH[data]))
    print("\nconfig data  attn_cost   c_tok µs  c_pair ns  c_fwd ms  kappa  pass tok  fit err  "
          "per batch: auto's pick (its time / fastest's, / padded4's) | fastest")
    for r in results:
        picks = ", ".join(f"{p['auto']} ({p['auto_over_fastest']:.2f}x, "
                          f"{p['auto_over_padded4']:.2f}x) | {p['fastest']}" for p in r["picks"])
        print(f"{r['config']:6s} {r['data']:4s} {r['attention_cost']:.2e} "
              f"{r['c_tok_ns'] / 1e3:9.2f} {r['c_pair_ns']:9.3f} {r['c_fwd_ms']:9.2f} "
              f"{r['kappa']:6.2f} {r['pass_tokens']:9.0f} {r['fit_max_rel_err']:7.1%}  {picks}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
