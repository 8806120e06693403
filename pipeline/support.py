"""The support of a metric: how many items it rests on and a 95% interval, so that no number is
reported without what it stands on.

Rates get a Wilson score interval (sound near 0 and 1 and for small n, unlike the normal
approximation); means and win rates get a percentile bootstrap over prompts (the unit that was
sampled), drawn from a generator seeded from params. A rate over generations with several
samples of one prompt (`generate.samples_per_prompt` > 1) gets a cluster bootstrap over prompts
(`clustered_rate_support`): samples of one prompt are correlated, and Wilson would count them
as independent draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Support:
    n: int
    low: float
    high: float

    def flat(self, key: str) -> dict[str, float | int]:
        """`key_n`, `key_ci_low`, `key_ci_high`: flat keys, as `dvc exp show` lists them."""
        return {f"{key}_n": self.n, f"{key}_ci_low": self.low, f"{key}_ci_high": self.high}


def wilson(successes: float, n: int, z: float = Z95) -> Support:
    """Wilson score interval of a rate of `successes` in `n` (a tie counted as ½ is allowed)."""
    if n == 0:
        return Support(0, math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Support(n, max(0.0, centre - half), min(1.0, centre + half))


def rate_support(flags: np.ndarray) -> Support:
    """Support of the mean of 0/1 (or ½ for ties) values."""
    values = np.asarray(flags, dtype=np.float64)
    return wilson(float(values.sum()), len(values))


def clustered_rate_support(flags: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int
                           ) -> Support:
    """Support of a rate over items grouped in clusters (generations, by `prompt_id`).

    With one item per cluster this is `rate_support` (Wilson), exactly. Otherwise the prompts
    are resampled (a cluster bootstrap: each resample draws as many prompts as there are, with
    replacement, and takes the rate over all their items, Σ successes / Σ items), `n` is the
    number of prompts, and the percentile interval is widened to contain the Wilson interval of
    the items taken as independent: where every resample gives the same rate (a rate of 0 or 1,
    or very few prompts) the bootstrap collapses to a point, and samples of one prompt carry no
    more information than independent draws would.
    """
    values = np.asarray(flags, dtype=np.float64)
    keys = np.asarray(clusters)
    if len(values) != len(keys):
        raise ValueError(f"{len(values)} flags but {len(keys)} cluster keys")
    codes, inverse = np.unique(keys, return_inverse=True)
    independent = rate_support(values)
    if len(codes) == len(values):
        return independent
    hits = np.bincount(inverse, weights=values, minlength=len(codes))
    sizes = np.bincount(inverse, minlength=len(codes)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(codes), size=(n_boot, len(codes)))
    rates = hits[draw].sum(axis=1) / sizes[draw].sum(axis=1)
    low, high = np.quantile(rates, [0.025, 0.975])
    return Support(len(codes), float(min(low, independent.low)),
                   float(max(high, independent.high)))


def bootstrap_mean(per_unit: np.ndarray, n_boot: int, seed: int) -> Support:
    """Percentile bootstrap of the mean of per-unit values (one value per prompt)."""
    values = np.asarray(per_unit, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Support(0, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Support(len(values), float(low), float(high))


def share(k: int, n: int) -> str:
    """`k of n (p%)`: the count first, and a percentage that reads 0% or 100% only when it is
    (209 of 210 is 99.5%, never 100%)."""
    if n == 0:
        return "0 of 0"
    pct = 100.0 * k / n
    digits = 1
    while digits < 6 and 0 < k < n and float(f"{pct:.{digits}f}") in (0.0, 100.0):
        digits += 1
    return f"{k} of {n} ({pct:.{0 if k in (0, n) else digits}f}%)"


def low_support(supports: Mapping[str, Support], min_n: int) -> list[str]:
    """Metrics that rest on fewer than `min_n` items."""
    return sorted(k for k, s in supports.items() if s.n < min_n)
