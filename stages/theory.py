"""`safedpo theory`: the tabular check that SafeDPO reaches the closed-form safe optimum.

Writes data/theory/curves.parquet (one row per run and step), data/theory/metrics.json and
data/theory/convergence.png. All the work is in pipeline/theory.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json, write_parquet
from pipeline.config import load_params
from pipeline.paths import THEORY_CURVES as CURVES
from pipeline.paths import THEORY_METRICS as METRICS
from pipeline.paths import THEORY_PLOT as PLOT
from pipeline.theory import plot_convergence, run_theory


def run(params_file: Path) -> None:
    cfg = load_params(params_file).theory
    t0 = time.perf_counter()
    result = run_theory(cfg)
    write_parquet(result.curves, CURVES)
    write_json(result.metrics, METRICS)
    plot_convergence(result.curves, PLOT, result.metrics)
    print(summary(result.metrics, time.perf_counter() - t0))


def summary(metrics: dict[str, Any], seconds: float) -> str:
    """A few lines for the terminal; the full figures are in metrics.json."""
    th = metrics["theory"]
    lines = [
        f"sampling floor TV(π̂*, π*): realised {th['mle_opt_tv_to_opt']:.4f}, "
        f"mean {th['tv_sampling_mean']:.4f}, q99 {th['tv_sampling_q99']:.4f}",
        f"{'run':<14} {'TV to π*':>9} {'TV to π̂*':>9} {'unsafe':>9} {'steps→tol':>9}",
    ]
    for name, r in metrics["runs"].items():
        steps = r["steps_to_unsafe_tol"]
        failed = [c for c, ok in r.get("checks", {}).items() if ok is False]
        verdict = ("" if "checks" not in r else
                   "  check: pass" if not failed else f"  check: FAIL ({', '.join(failed)})")
        lines.append(f"{name:<14} {r['tv_to_opt']:>9.4f} {r['tv_to_mle_opt']:>9.4f} "
                     f"{r['unsafe_mass']:>9.2e} {steps if steps is not None else '-':>9}{verdict}")
    verdict = "passed at every Δ" if metrics["passed"] else "FAILED (see the runs above)"
    lines.append(f"theory check of {metrics['objective_under_test']}: {verdict}")
    lines.append(f"wrote {CURVES}, {METRICS}, {PLOT} in {seconds:.1f} s")
    return "\n".join(lines)
