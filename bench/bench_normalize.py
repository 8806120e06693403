"""Time `normalize` on 100,000 PKU-SafeRLHF (v1) shaped rows.

Rows have realistic, varied lengths (prompts ~15 words, responses lognormal around 80 words,
up to a few hundred), the v1 extra columns (nested harm-category dicts, severities, sources,
sha256s), and about 3% bad rows of every kind normalize rejects. The file is written to a temp
folder; the timed part is what the stage does: read the raw Parquet, normalize, write the pairs.

    python bench/bench_normalize.py [--rows 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import read_parquet, write_json, write_parquet
from pipeline.normalize import PAIRS_SCHEMA, normalize_splits

HARM_CATEGORIES = ["Endangering National Security", "Insulting Behavior", "Violence",
                   "Privacy Violation", "Drugs", "Cybercrime", "Economic Crime",
                   "White-Collar Crime"]


def _texts(rng: np.random.Generator, n: int, mean_words: float, sigma: float) -> list[str]:
    vocab = np.array([f"w{i}" for i in range(5000)], dtype=object)
    lengths = np.clip(rng.lognormal(np.log(mean_words), sigma, n).astype(int), 1, 400)
    words = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
    cuts = np.cumsum(lengths)[:-1]
    return [" ".join(chunk) for chunk in np.split(words, cuts)]


def make_rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prompts = _texts(rng, n // 3 + 1, 15, 0.5)
    df = pd.DataFrame({
        "prompt": [prompts[i] for i in rng.integers(0, len(prompts), n)],
        "response_0": _texts(rng, n, 80, 0.7),
        "response_1": _texts(rng, n, 80, 0.7),
        "prompt_source": rng.choice(["Alpaca-7B", "Alpaca2-7B", "Alpaca3-8B"], n),
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca2-7B",
    })
    safe0, safe1 = rng.random(n) < 0.5, rng.random(n) < 0.5
    df["is_response_0_safe"], df["is_response_1_safe"] = safe0, safe1
    df["response_0_sha256"] = "0" * 64
    df["response_1_sha256"] = "1" * 64
    cats = [{c: bool(v) for c, v in zip(HARM_CATEGORIES, row, strict=True)}
            for row in rng.random((64, len(HARM_CATEGORIES))) < 0.2]
    df["response_0_harm_category"] = [cats[i] for i in rng.integers(0, 64, n)]
    df["response_1_harm_category"] = [cats[i] for i in rng.integers(0, 64, n)]
    df["response_0_severity_level"] = np.where(safe0, 0, rng.integers(1, 4, n))
    df["response_1_severity_level"] = np.where(safe1, 0, rng.integers(1, 4, n))
    df["better_response_id"] = rng.integers(0, 2, n)
    # safer follows the flags where they differ, so only the injected rows contradict.
    df["safer_response_id"] = np.where(safe0 == safe1, rng.integers(0, 2, n),
                                       np.where(safe0, 0, 1))
    bad = rng.choice(n, size=n * 3 // 100, replace=False)
    for k, i in enumerate(bad):
        kind = k % 6
        if kind == 0:
            df.at[i, "response_1"] = df.at[i, "response_0"]
        elif kind == 1:
            df.at[i, "prompt"] = None
        elif kind == 2:
            df.at[i, "response_0"] = "   "
        elif kind == 3:
            df.at[i, "is_response_0_safe"], df.at[i, "is_response_1_safe"] = False, True
            df.at[i, "safer_response_id"] = 0
        elif kind == 4:
            df.at[i, "response_0_severity_level"] = 7
        else:
            df.at[i, "better_response_id"] = 2
    df["source_row"] = np.arange(n)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        df = make_rows(args.rows, args.seed)
        write_parquet(df, d / "raw_train.parquet")
        write_parquet(make_rows(max(1, args.rows // 10), args.seed + 1), d / "raw_test.parquet")
        size_mb = (d / "raw_train.parquet").stat().st_size / 1e6
        t0 = time.perf_counter()
        train_raw = read_parquet(d / "raw_train.parquet")
        test_raw = read_parquet(d / "raw_test.parquet")
        t1 = time.perf_counter()
        train, test, report = normalize_splits(train_raw, test_raw, "auto")
        t2 = time.perf_counter()
        write_parquet(train, d / "train.parquet", schema=PAIRS_SCHEMA)
        write_parquet(test, d / "test.parquet", schema=PAIRS_SCHEMA)
        write_json(report, d / "report.json")
        t3 = time.perf_counter()
    r = report["train"]
    print(f"rows: {args.rows} train ({size_mb:.1f} MB parquet) + {len(test_raw)} test; "
          f"layout {r['layout']}")
    print(f"train: {r['rows_out']} out, {r['rows_rejected']} rejected "
          f"{ {k: v for k, v in r['rejected_by_reason'].items() if v} }")
    print(f"read {t1 - t0:.2f} s, normalize {t2 - t1:.2f} s, write {t3 - t2:.2f} s, "
          f"total {t3 - t0:.2f} s")


if __name__ == "__main__":
    main()
