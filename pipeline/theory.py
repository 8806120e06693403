"""Tabular check that SafeDPO reaches the closed-form safe optimum (arXiv 2505.20065).

The paper's claim: the safety-constrained KL-regularised objective has the optimum

    π*(y|x) ∝ π_ref(y|x) · exp(r(x, y)/β) · 1[y safe],

DPO on the transformed pairs T(D) reaches it, and the margin Δ leaves it where it is (Prop. 4.4)
while speeding the way there. Here the "language model" is a table of logits θ[x, y] (K prompts,
M responses), so every quantity has a closed form and the claim can be checked to the digit.

What the check is built on (the reasoning behind the thresholds in tests/test_theory.py):

* Labels come from Bradley-Terry on the true rewards, P(y_i ≻ y_j) = σ(r_i − r_j). With a finite
  budget, DPO converges to the BT maximum-likelihood rewards r̂ of the comparisons it saw, not to
  r. So the optimum it can reach is π̂* ∝ π_ref·exp(r̂/β)·1[safe]; `bt_mle` computes r̂ on its own
  (Newton's method, no shared code) so optimisation error TV(π_θ, π̂*) and sampling error
  TV(π̂*, π*) can be told apart.
* The budget is spread evenly over every (prompt, unordered response pair), so every response is
  compared with every other one (a complete comparison graph): r̂ exists and is unique up to a
  per-prompt constant, and no response keeps its reference ratio merely for never being seen.
* `sampling_bounds` gives the distribution of TV(π̂*, π*) from the asymptotic normality of the BT
  MLE (covariance = pseudo-inverse of the Fisher information at the true rewards, for the actual
  comparison counts); its 99th percentile is the derived tolerance for "close to π*".
* Under T(D) an unsafe response is only ever a loser, so its logit is pushed down for ever: the
  unsafe mass tends to 0 but never reaches it. The margin Δ keeps the sigmoid weight
  σ(Δ − β·gap) near 1 until the log-ratio gap exceeds Δ/β, so the descent is linear rather than
  logarithmic for longer: more Δ, fewer steps to a given unsafe mass.
* The policy is trained with plain full-batch gradient descent. Adam would normalise each
  coordinate's step to ≈ lr whatever the gradient's size, which hides exactly the gradient-size
  effect through which Δ acts.

The training loop uses the pipeline's own objectives (`pipeline.objectives`: pair selection, i.e.
T(D) for SafeDPO, and the loss) on a pairs table in the normalized schema, so this checks
the code that trains the language model, not a copy of it. Each Δ run of the objective under
test gets a verdict (`safedpo_checks`): its pairs against the paper's rule (`transform_by_rule`,
written apart from the code it checks), its distances to the optima, and its pace and end point
beside the other Δ runs (docs/theory.md, "The check").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import objectives
from pipeline.artifacts import atomic_path, text_hash
from pipeline.config import TheoryConfig

BASELINES: tuple[str, ...] = ("dpo_helpful", "dpo_harmless", "dpo_safebetter")
#: Optimisation error allowed on the safe log-ratios, in nats (tests/test_theory.py derives it).
LOGRATIO_TOL = 0.05
CURVE_COLUMNS = ["run", "step", "objective", "delta", "loss", "tv_to_opt", "tv_to_mle_opt",
                 "unsafe_mass", "logratio_rmse", "logratio_rmse_to_mle"]


@dataclass(frozen=True)
class TabularProblem:
    """K prompts × M responses with rewards, safety flags, a reference policy and labelled pairs."""

    rewards: np.ndarray    # (K, M) true helpfulness reward r(x, y)
    unsafe: np.ndarray     # (K, M) bool, h = 1 means unsafe
    cost: np.ndarray       # (K, M) latent cost; orders `safer_id` among equally safe responses
    ref_logp: np.ndarray   # (K, M) log π_ref(y|x)
    beta: float
    pairs: pd.DataFrame    # normalized pairs schema (docs/architecture.md)

    @property
    def shape(self) -> tuple[int, int]:
        k, m = self.rewards.shape
        return k, m


def prompt_name(k: int) -> str:
    return f"x{k}"


def response_name(m: int) -> str:
    return f"y{m}"


def _name_index(names: pd.Series) -> np.ndarray:
    """"x3" -> 3, "y5" -> 5: the table index behind `prompt_name` / `response_name`."""
    return names.str[1:].astype(np.int64).to_numpy()


def n_unsafe_per_prompt(cfg: TheoryConfig) -> int:
    """Unsafe responses per prompt: the share rounded, kept in [1, M − 2].

    At least one unsafe response makes T(D) do something; at least two safe ones make the safe
    log-ratios, and hence the distance to π*, carry information.
    """
    return int(min(max(round(cfg.unsafe_share * cfg.n_responses), 1), cfg.n_responses - 2))


def make_problem(cfg: TheoryConfig) -> TabularProblem:
    """Draw the problem and a pair budget of `cfg.n_pairs` BT-labelled comparisons (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    k_, m_ = cfg.n_prompts, cfg.n_responses
    n_unsafe = n_unsafe_per_prompt(cfg)
    unsafe = np.zeros((k_, m_), dtype=bool)
    for k in range(k_):
        unsafe[k, rng.choice(m_, size=n_unsafe, replace=False)] = True
    # The bonus makes unsafe answers the more helpful ones on average: the tension that makes
    # helpfulness-only DPO unsafe and that SafeDPO has to resolve.
    rewards = rng.normal(size=(k_, m_)) + cfg.unsafe_bonus * unsafe
    cost = rng.normal(size=(k_, m_))
    ref_logits = rng.normal(size=(k_, m_))
    ref_logp = ref_logits - np.logaddexp.reduce(ref_logits, axis=1, keepdims=True)
    pairs = _sample_pairs(rng, rewards, unsafe, cost, cfg.n_pairs)
    return TabularProblem(rewards=rewards, unsafe=unsafe, cost=cost, ref_logp=ref_logp,
                          beta=cfg.beta, pairs=pairs)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _sample_pairs(rng: np.random.Generator, rewards: np.ndarray, unsafe: np.ndarray,
                  cost: np.ndarray, n_pairs: int) -> pd.DataFrame:
    k_, m_ = rewards.shape
    combos = np.array([(k, i, j) for k in range(k_) for i, j in combinations(range(m_), 2)])
    # Even allocation, remainder at random: every pair is compared ⌊n/U⌋ or ⌈n/U⌉ times, which
    # keeps the comparison graph complete and the BT sampling error uniform and small.
    counts = np.full(len(combos), n_pairs // len(combos))
    counts[rng.choice(len(combos), size=n_pairs % len(combos), replace=False)] += 1
    k, i, j = np.repeat(combos, counts, axis=0).T
    # Random presentation order, so that neither position carries information.
    flip = rng.random(len(k)) < 0.5
    a, b = np.where(flip, j, i), np.where(flip, i, j)
    a_better = rng.random(len(k)) < _sigmoid(rewards[k, a] - rewards[k, b])
    ua, ub = unsafe[k, a], unsafe[k, b]
    # Safety preference: the safe response when the flags differ (a contradicting label would be
    # rejected by normalize), otherwise BT on the latent cost.
    a_safer = np.where(ua != ub, ~ua, rng.random(len(k)) < _sigmoid(cost[k, b] - cost[k, a]))
    prompts = np.array([prompt_name(x) for x in range(k_)], dtype=object)
    responses = np.array([response_name(x) for x in range(m_)], dtype=object)
    prompt_ids = np.array([text_hash(p) for p in prompts], dtype=object)
    pair_ids = np.empty((k_, m_, m_), dtype=object)
    for x in range(k_):
        for y0 in range(m_):
            for y1 in range(m_):
                pair_ids[x, y0, y1] = text_hash(prompts[x], responses[y0], responses[y1])
    return pd.DataFrame({
        "pair_id": pair_ids[k, a, b],
        "prompt_id": prompt_ids[k],
        "prompt": prompts[k],
        "response_0": responses[a],
        "response_1": responses[b],
        "unsafe_0": ua,
        "unsafe_1": ub,
        "better_id": np.where(a_better, 0, 1).astype(np.int8),
        "safer_id": np.where(a_safer, 0, 1).astype(np.int8),
    })


def _normalize_log(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over responses; -inf logits (excluded responses) stay -inf."""
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def safe_optimum(ref_logp: np.ndarray, rewards: np.ndarray, unsafe: np.ndarray,
                 beta: float) -> np.ndarray:
    """Closed form π*(y|x) ∝ π_ref(y|x)·exp(r(x,y)/β)·1[y safe], as probabilities (K, M)."""
    logits = np.where(unsafe, -np.inf, ref_logp + rewards / beta)
    return np.exp(_normalize_log(logits))


def unconstrained_optimum(ref_logp: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """π_ref·exp(r/β) normalised: where helpfulness-only DPO heads, unsafe responses included."""
    return np.exp(_normalize_log(ref_logp + rewards / beta))


def win_counts(selected: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    """W[k, i, j] = how often response i beat response j for prompt k in a selected-pairs table."""
    k_, m_ = shape
    wins = np.zeros((k_, m_, m_))
    k, w, lo = (_name_index(selected[c]) for c in ("prompt", "chosen", "rejected"))
    np.add.at(wins, (k, w, lo), 1.0)
    return wins


def bt_mle(wins: np.ndarray, mask: np.ndarray, iters: int = 100) -> np.ndarray:
    """Bradley-Terry MLE of the rewards from win counts, per prompt, over responses in `mask`.

    Newton's method on the concave log-likelihood; each prompt's scores are centred (they are only
    identified up to a constant, which cancels in the policy). Entries outside `mask` are NaN.
    A ridge of 1e-9 only guards against a singular Hessian; it moves r̂ by far less than 1e-6.
    """
    k_, m_ = mask.shape
    out = np.full((k_, m_), np.nan)
    for k in range(k_):
        idx = np.flatnonzero(mask[k])
        w = wins[k][np.ix_(idx, idx)]
        n = w + w.T
        s = np.zeros(len(idx))
        for _ in range(iters):
            p = _sigmoid(s[:, None] - s[None, :])          # P(i beats j)
            grad = (w - n * p).sum(axis=1)
            hess = n * p * (1 - p)
            hess = np.diag(hess.sum(axis=1)) - hess + 1e-9 * np.eye(len(idx))
            step = np.linalg.solve(hess, grad)
            s += step
            s -= s.mean()
            if np.abs(step).max() < 1e-12:
                break
        out[k, idx] = s
    return out


def sampling_bounds(problem: TabularProblem, wins: np.ndarray, n_draws: int = 4000,
                    seed: int = 0) -> dict[str, float]:
    """How far π̂* (from BT-MLE rewards) lies from π* at this budget, from BT asymptotics.

    r̂ − r ≈ N(0, I⁺) per prompt, with I the Fisher information of the safe-vs-safe comparisons
    at the true rewards: I = Σ_ij n_ij p_ij (1 − p_ij) (e_i − e_j)(e_i − e_j)ᵀ. Drawing r̂ from that
    law and computing TV(π̂*, π*) and the RMS error of the safe log-ratios exactly gives their mean
    and 99th percentile: the sampling part of the distance any optimiser can reach.
    """
    rng = np.random.default_rng([seed, 1])
    beta = problem.beta
    pi_star = safe_optimum(problem.ref_logp, problem.rewards, problem.unsafe, beta)
    k_, _ = problem.shape
    tv = np.zeros(n_draws)
    sq_err = np.zeros(n_draws)
    n_safe_pairs = 0
    for k in range(k_):
        idx = np.flatnonzero(~problem.unsafe[k])
        r = problem.rewards[k, idx]
        n = wins[k][np.ix_(idx, idx)]
        n = n + n.T
        p = _sigmoid(r[:, None] - r[None, :])
        info = n * p * (1 - p)
        info = np.diag(info.sum(axis=1)) - info
        vals, vecs = np.linalg.eigh(np.linalg.pinv(info))
        root = vecs * np.sqrt(np.clip(vals, 0.0, None))  # root @ root.T = I⁺
        eps = rng.standard_normal((n_draws, len(idx))) @ root.T / beta
        q = pi_star[k, idx] * np.exp(eps - eps.max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        tv += 0.5 * np.abs(q - pi_star[k, idx]).sum(axis=1)
        diff = eps[:, :, None] - eps[:, None, :]
        iu = np.triu_indices(len(idx), 1)
        sq_err += (diff[:, iu[0], iu[1]] ** 2).sum(axis=1)
        n_safe_pairs += len(iu[0])
    tv /= k_
    rmse = np.sqrt(sq_err / n_safe_pairs)
    return {
        "tv_sampling_mean": float(tv.mean()),
        "tv_sampling_q99": float(np.quantile(tv, 0.99)),
        "logratio_rmse_sampling_mean": float(rmse.mean()),
        "logratio_rmse_sampling_q99": float(np.quantile(rmse, 0.99)),
    }


@dataclass(frozen=True)
class RunResult:
    name: str
    objective: str
    delta: float
    uses_delta: bool
    curve: pd.DataFrame
    final_logp: np.ndarray  # (K, M) log π_θ after the last step
    counts: dict[str, int]


def _grouped_pairs(selected: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Identical (prompt, chosen, rejected) rows merged with a count weight.

    The weighted mean over groups equals the mean over the individual pairs, so the gradient is
    exactly the full-batch one; merging only makes a step's cost independent of the budget.
    """
    keys = ["prompt", "chosen", "rejected", "h_chosen", "h_rejected"]
    g = selected.groupby(keys, sort=True, observed=True).size().reset_index(name="count")
    count = g["count"].to_numpy(dtype=np.float64)

    def index(col: str) -> torch.Tensor:
        return torch.tensor(_name_index(g[col]), dtype=torch.long)

    return {
        "k": index("prompt"), "w": index("chosen"), "l": index("rejected"),
        "h_w": torch.tensor(g["h_chosen"].to_numpy(dtype=bool)),
        "h_l": torch.tensor(g["h_rejected"].to_numpy(dtype=bool)),
        "weight": torch.as_tensor(count / count.sum(), dtype=torch.float64),
    }


def train_tabular(problem: TabularProblem, objective: str | objectives.Objective, delta: float,
                  steps: int, lr: float, mle_opt: np.ndarray) -> RunResult:
    """Full-batch gradient descent θ ← θ − lr·∇L(θ) on a tabular softmax policy from π_ref.

    `objective` (a name, or an `Objective` itself) goes through `select_pairs` and the pipeline's
    loss, exactly as in `train`. The curve has one row per step (step 0 is π_ref) with the
    distances used by the tests.
    """
    obj = objectives.get(objective) if isinstance(objective, str) else objective
    selected, counts = objectives.select_pairs(problem.pairs, obj)
    batch = _grouped_pairs(selected)
    k, w, lo = batch["k"], batch["w"], batch["l"]
    beta = problem.beta
    ref = torch.as_tensor(problem.ref_logp, dtype=torch.float64)
    ref_w, ref_l = ref[k, w], ref[k, lo]
    theta = ref.clone()
    # The loop only records θ and the loss; the curve metrics are computed afterwards over the
    # whole trajectory at once, since per-step tensor ops, not arithmetic, dominate the cost.
    trajectory = torch.empty((steps + 1, *theta.shape), dtype=torch.float64)
    losses_t = torch.empty(steps + 1, dtype=torch.float64)
    for step in range(steps + 1):
        theta.requires_grad_(True)
        logp = torch.log_softmax(theta, dim=1)
        losses, _, _ = obj.loss(logp[k, w], logp[k, lo], ref_w, ref_l, batch["h_w"],
                                batch["h_l"], beta, delta)
        loss = (losses * batch["weight"]).sum()
        (grad,) = torch.autograd.grad(loss, theta)
        theta = theta.detach()
        trajectory[step] = theta
        losses_t[step] = loss.detach()
        theta = theta - lr * grad

    traj_logp = torch.log_softmax(trajectory, dim=-1).numpy()
    stats = policy_metrics(traj_logp, problem, mle_opt)
    name = run_name(obj, delta)
    curve = pd.DataFrame({
        "run": name,
        "step": np.arange(steps + 1, dtype=np.int64),
        "objective": obj.name,
        "delta": float(delta) if obj.uses_delta else float("nan"),
        "loss": losses_t.numpy(),
        **{c: stats[c] for c in CURVE_COLUMNS[5:]},
    })
    return RunResult(name=name, objective=obj.name, delta=delta, uses_delta=obj.uses_delta,
                     curve=curve, final_logp=traj_logp[-1], counts=counts.as_dict())


def _safe_pairs(unsafe: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, i, j) index arrays of every unordered pair of safe responses."""
    rows = [(k, i, j) for k in range(unsafe.shape[0])
            for i, j in combinations(np.flatnonzero(~unsafe[k]).tolist(), 2)]
    k, i, j = (np.asarray(c, dtype=np.int64) for c in zip(*rows, strict=True))
    return k, i, j


def policy_metrics(logp: np.ndarray, problem: TabularProblem,
                   mle_opt: np.ndarray) -> dict[str, np.ndarray]:
    """Distances of policies `logp` (..., K, M) to the optima; one value per leading index.

    TV and unsafe mass are averaged over prompts (a uniform prompt distribution). The log-ratio
    error is over safe pairs: [log π/π_ref](y_i) − [log π/π_ref](y_j) − (r_i − r_j)/β.
    """
    beta = problem.beta
    pi_star = safe_optimum(problem.ref_logp, problem.rewards, problem.unsafe, beta)
    p = np.exp(logp)
    k, i, j = _safe_pairs(problem.unsafe)
    a = logp - problem.ref_logp - problem.rewards / beta
    err = np.abs(a[..., k, i] - a[..., k, j])
    # The same error against the BT-MLE optimum: the optimisation part alone.
    log_mle = np.log(mle_opt[k, i] / mle_opt[k, j])
    err_mle = np.abs(logp[..., k, i] - logp[..., k, j] - log_mle)
    return {
        "tv_to_opt": 0.5 * np.abs(p - pi_star).sum(axis=-1).mean(axis=-1),
        "tv_to_mle_opt": 0.5 * np.abs(p - mle_opt).sum(axis=-1).mean(axis=-1),
        "unsafe_mass": (p * problem.unsafe).sum(axis=-1).mean(axis=-1),
        "logratio_rmse": np.sqrt((err ** 2).mean(axis=-1)),
        "logratio_rmse_to_mle": np.sqrt((err_mle ** 2).mean(axis=-1)),
        "logratio_max_err": err.max(axis=-1),
    }


def run_name(objective: str | objectives.Objective, delta: float) -> str:
    obj = objectives.get(objective) if isinstance(objective, str) else objective
    return f"{obj.name}_d{delta:g}" if obj.uses_delta else obj.name


def first_step_at_or_below(values: np.ndarray, tol: float) -> int | None:
    """The first step whose value is <= tol, or None if it never gets there."""
    hit = np.flatnonzero(values <= tol)
    return int(hit[0]) if hit.size else None


@dataclass(frozen=True)
class TheoryResult:
    problem: TabularProblem
    curves: pd.DataFrame
    metrics: dict[str, Any]  # what metrics.json holds; same params, same file
    runs: dict[str, RunResult]


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread, restoring the previous setting afterwards.

    Every tensor here has at most a few hundred elements; waking an intra-op thread pool costs
    more than the arithmetic (measured: log_softmax on 8×6 takes ~6 ms with 2 threads, 10 µs
    with 1), so the whole check would be ~500× slower multi-threaded.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_theory(cfg: TheoryConfig, safedpo: objectives.Objective | None = None,
               baselines: tuple[str, ...] = BASELINES) -> TheoryResult:
    """Build the problem, train the SafeDPO objective at every Δ and the baselines, summarise,
    and judge each Δ run against the theory (`safedpo_checks`).

    `safedpo` is the objective under test (default: the pipeline's `safedpo`); the tests pass
    mutants of it here, which the checks must fail at every Δ.
    """
    with _single_thread():
        return _run_theory(cfg, safedpo or objectives.get("safedpo"), baselines)


def _run_theory(cfg: TheoryConfig, safedpo: objectives.Objective,
                baselines: tuple[str, ...]) -> TheoryResult:
    problem = make_problem(cfg)
    beta = cfg.beta

    # The empirical optimum SafeDPO can reach: BT MLE on the safe-vs-safe pairs of T(D) (as the
    # paper's rule gives them, not as the objective under test selects them).
    expected = transform_by_rule(problem.pairs)
    kept = expected[expected["action"] != "drop"]
    safe_safe = kept[~kept["h_chosen"] & ~kept["h_rejected"]]
    wins = win_counts(safe_safe, problem.shape)
    r_hat = bt_mle(wins, ~problem.unsafe)
    # r̂ is NaN on unsafe responses (never compared with a safe one as a winner); the indicator
    # removes them anyway, the 0 only keeps the arithmetic finite.
    pi_mle = safe_optimum(problem.ref_logp, np.nan_to_num(r_hat), problem.unsafe, beta)
    bounds = sampling_bounds(problem, wins, seed=cfg.seed)

    runs: dict[str, RunResult] = {}
    for delta in cfg.deltas:
        res = train_tabular(problem, safedpo, delta, cfg.steps, cfg.lr, pi_mle)
        runs[res.name] = res
    tested = list(runs)
    for objective in baselines:
        res = train_tabular(problem, objective, 0.0, cfg.steps, cfg.lr, pi_mle)
        runs[res.name] = res

    run_metrics = {name: _summarise(res, problem, pi_mle, cfg.tolerance)
                   for name, res in runs.items()}
    rule = pairs_follow_rule(problem.pairs, safedpo, expected)
    checks = safedpo_checks([runs[n] for n in tested], run_metrics, rule, bounds, cfg.tolerance)
    for name, row in checks.items():
        run_metrics[name]["checks"] = row
        run_metrics[name]["passed"] = all(v is not False for v in row.values())
    with np.errstate(divide="ignore"):  # log 0 = -inf on unsafe responses is intended
        mle_at_opt = policy_metrics(np.log(pi_mle), problem, pi_mle)
    helpful_opt = unconstrained_optimum(problem.ref_logp, problem.rewards, beta)
    n_combos = cfg.n_prompts * cfg.n_responses * (cfg.n_responses - 1) // 2
    metrics: dict[str, Any] = {
        "problem": {
            "n_prompts": cfg.n_prompts,
            "n_responses": cfg.n_responses,
            "n_unsafe_per_prompt": n_unsafe_per_prompt(cfg),
            "unsafe_bonus": cfg.unsafe_bonus,
            "n_pairs": cfg.n_pairs,
            "comparisons_per_pair_min": int(cfg.n_pairs // n_combos),
            "beta": beta,
            "steps": cfg.steps,
            "lr": cfg.lr,
            "tolerance": cfg.tolerance,
            "seed": cfg.seed,
        },
        "theory": {
            "ref_unsafe_mass": float((np.exp(problem.ref_logp) * problem.unsafe).sum(1).mean()),
            "helpful_opt_unsafe_mass": float((helpful_opt * problem.unsafe).sum(1).mean()),
            "mle_opt_tv_to_opt": float(mle_at_opt["tv_to_opt"]),
            "mle_opt_logratio_rmse": float(mle_at_opt["logratio_rmse"]),
            **bounds,
            "tdd_rule": {a: int((expected["action"] == a).sum())
                         for a in ("keep", "swap", "drop")},
        },
        "objective_under_test": safedpo.name,
        "passed": all(run_metrics[n]["passed"] for n in tested),
        "runs": run_metrics,
    }
    curves = pd.concat([r.curve for r in runs.values()], ignore_index=True)
    return TheoryResult(problem=problem, curves=curves, metrics=metrics, runs=runs)


def transform_by_rule(pairs: pd.DataFrame) -> pd.DataFrame:
    """T(D) as the paper states it (Sec. 4.1), one row per input pair: orient by `better_id`;
    keep if the winner is safe, swap if only the loser is safe, drop if both are unsafe.

    Written here apart from `pipeline.selection` and `pipeline.objectives`, which it checks, so
    that a change to either cannot move the reference with it.
    """
    b1 = pairs["better_id"].to_numpy(dtype=np.int64) == 1
    r0, r1 = pairs["response_0"].to_numpy(), pairs["response_1"].to_numpy()
    u0, u1 = pairs["unsafe_0"].to_numpy(dtype=bool), pairs["unsafe_1"].to_numpy(dtype=bool)
    win, lose = np.where(b1, r1, r0), np.where(b1, r0, r1)
    h_win, h_lose = np.where(b1, u1, u0), np.where(b1, u0, u1)
    action = np.where(~h_win, "keep", np.where(~h_lose, "swap", "drop"))
    swap = action == "swap"
    return pd.DataFrame({
        "pair_id": pairs["pair_id"].to_numpy(), "prompt": pairs["prompt"].to_numpy(),
        "chosen": np.where(swap, lose, win), "rejected": np.where(swap, win, lose),
        "h_chosen": np.where(swap, h_lose, h_win), "h_rejected": np.where(swap, h_win, h_lose),
        "action": action})


def pairs_follow_rule(pairs: pd.DataFrame, objective: objectives.Objective,
                      expected: pd.DataFrame) -> bool:
    """Whether `objective` trains on exactly T(D): the same kept, swapped and dropped counts
    and the same multiset of (pair, chosen, rejected) as `transform_by_rule` gives.

    The policy cannot tell: a T(D) that drops instead of swapping, or keeps both-unsafe pairs,
    still leaves unsafe responses only ever losing to safe ones, so it heads for the same π̂*
    (only the pace differs); the pairs are where such a transform differs from the paper's.
    """
    selected, counts = objectives.select_pairs(pairs, objective)
    want = {a: int((expected["action"] == a).sum()) for a in ("keep", "swap", "drop")}
    got = {"keep": counts.kept, "swap": counts.swapped, "drop": counts.dropped}
    if got != want:
        return False
    cols = ["pair_id", "chosen", "rejected"]
    kept = expected.loc[expected["action"] != "drop", cols]
    return bool(selected[cols].value_counts().sort_index()
                .equals(kept.value_counts().sort_index()))


def _steps_or_inf(value: int | None) -> float:
    return math.inf if value is None else float(value)


def safedpo_checks(runs: list[RunResult], run_metrics: dict[str, dict[str, Any]],
                   pairs_ok: bool, bounds: dict[str, float], tol: float
                   ) -> dict[str, dict[str, bool | None]]:
    """What the theory asserts of each Δ run of the objective under test (True: holds).

    - `pairs_are_tdd`: it trains on T(D) (`pairs_follow_rule`);
    - `unsafe_mass`, `tv_to_mle_opt`: ≤ tol after the step budget;
    - `tv_to_opt`: ≤ q99 of the sampling error TV(π̂*, π*) + tol (the triangle inequality);
    - `logratio_rmse_to_mle`, `logratio_rmse`: safe log-ratios within LOGRATIO_TOL nats of π̂*,
      and of (r_i − r_j)/β up to the q99 of their sampling error;
    - `same_optimum` (Prop. 4.4): within 2·tol TV of every other Δ's final policy;
    - `margin_speeds_up`: no larger Δ needs more steps to the unsafe tolerance, no smaller Δ
      fewer (never reaching it counts as infinitely many); None with a single Δ.

    The last two compare a run with the others, which is what makes a flipped margin sign fail
    at Δ = 0 too: there its loss is the true one, but the runs beside it move the wrong way.
    """
    finals = {r.name: np.exp(r.final_logp) for r in runs}
    steps = {r.name: _steps_or_inf(run_metrics[r.name]["steps_to_unsafe_tol"]) for r in runs}
    out: dict[str, dict[str, bool | None]] = {}
    for r in runs:
        m = run_metrics[r.name]
        others = [o for o in runs if o.name != r.name]
        tv_others = [0.5 * np.abs(finals[r.name] - finals[o.name]).sum(1).mean() for o in others]
        order = [steps[o.name] >= steps[r.name] if o.delta < r.delta
                 else steps[o.name] <= steps[r.name] for o in others]
        out[r.name] = {
            "pairs_are_tdd": pairs_ok,
            "unsafe_mass": m["unsafe_mass"] <= tol,
            "tv_to_mle_opt": m["tv_to_mle_opt"] <= tol,
            "tv_to_opt": m["tv_to_opt"] <= bounds["tv_sampling_q99"] + tol,
            "logratio_rmse_to_mle": m["logratio_rmse_to_mle"] <= LOGRATIO_TOL,
            "logratio_rmse": m["logratio_rmse"]
            <= bounds["logratio_rmse_sampling_q99"] + LOGRATIO_TOL,
            "same_optimum": bool(all(tv <= 2 * tol for tv in tv_others)),
            "margin_speeds_up": (bool(all(order)) and math.isfinite(steps[r.name])
                                 if others else None),
        }
    return out


def _summarise(res: RunResult, problem: TabularProblem, mle_opt: np.ndarray,
               tol: float) -> dict[str, Any]:
    c = res.curve
    final = policy_metrics(res.final_logp, problem, mle_opt)
    return {
        "objective": res.objective,
        "delta": res.delta if res.uses_delta else None,
        **{key: float(v) for key, v in final.items()},
        "final_loss": float(c["loss"].iloc[-1]),
        "steps_to_unsafe_tol": first_step_at_or_below(c["unsafe_mass"].to_numpy(), tol),
        "steps_to_mle_opt_tol": first_step_at_or_below(c["tv_to_mle_opt"].to_numpy(), tol),
        "pairs": res.counts,
    }


def plot_convergence(curves: pd.DataFrame, dest: Path,
                     metrics: dict[str, Any] | None = None) -> None:
    """Unsafe mass and TV to π* against steps, one line per run; written atomically as PNG.

    With `metrics` (from `run_theory`), the unsafe-mass tolerance and the sampling floor
    TV(π̂*, π*) with its 99th percentile are drawn as horizontal reference lines.
    """
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_u, ax_tv = fig.subplots(1, 2, sharex=True)
    for name, c in curves.groupby("run", sort=False):
        c = c[c["step"] > 0]  # log x axis; step 0 is π_ref, the same for every run
        style = "-" if str(name).startswith("safedpo") else "--"
        ax_u.plot(c["step"], c["unsafe_mass"], style, label=name)
        ax_tv.plot(c["step"], c["tv_to_opt"], style, label=name)
    if metrics is not None:
        th = metrics["theory"]
        ax_u.axhline(metrics["problem"]["tolerance"], color="grey", ls=":", label="tolerance")
        ax_tv.axhline(th["mle_opt_tv_to_opt"], color="black", ls=":", lw=1,
                      label=r"TV($\hat\pi^*$, $\pi^*$) (sampling)")
        ax_tv.axhline(th["tv_sampling_q99"], color="grey", ls=":", lw=1,
                      label="sampling q99")
    ax_u.set(xscale="log", yscale="log", xlabel="gradient step", ylabel="unsafe mass",
             title="probability on unsafe responses")
    ax_tv.set(xscale="log", yscale="log", xlabel="gradient step",
              ylabel=r"TV($\pi_\theta$, $\pi^*$)",
              title="total variation to the closed-form safe optimum")
    for ax in (ax_u, ax_tv):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_path(Path(dest)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
