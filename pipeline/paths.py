"""Every artifact path of the pipeline, declared once. `dvc.yaml` uses the same strings and
`tests/test_paths.py` checks that the two agree.

Paths are relative to the repository root, where DVC runs every stage.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")

RAW_DIR = Path("data/raw")
RAW_TRAIN = RAW_DIR / "train.parquet"
RAW_TEST = RAW_DIR / "test.parquet"
SOURCE_JSON = RAW_DIR / "source.json"
SOURCE_KEY = Path("data/source_key.json")

PAIRS_DIR = Path("data/pairs")
PAIRS_TRAIN = PAIRS_DIR / "train.parquet"
PAIRS_TEST = PAIRS_DIR / "test.parquet"
PAIRS_REPORT = PAIRS_DIR / "report.json"

SFT_DIR = Path("data/sft")
# The content key of `model.name` (a local directory's weights hash): `sft` depends on it.
MODEL_KEY = Path("data/model_key.json")
# Inside every model directory the pipeline writes: the template it was trained with, and the
# notes of the stage that wrote it.
TEMPLATE_FILE = "prompt_template.json"
SUMMARY_FILE = "training_summary.json"
# Hashes of model files by (path, size, mtime), kept between the stages' processes beside DVC's
# own state (`.dvc/tmp` is git-ignored): a 7B model is hashed once, not by every stage run.
HASH_CACHE = Path(".dvc/tmp/safedpo-file-hashes.json")
# Who holds the project (pipeline/repolock.py): DVC's repository lock and its record of running
# stages, and the lock each stage command holds while it runs.
DVC_LOCK = Path(".dvc/tmp/lock")
DVC_RWLOCK = Path(".dvc/tmp/rwlock")
STAGE_LOCK = Path(".dvc/tmp/safedpo-stages.lock")

# Models converted from GGUF files (`pipeline.gguf`), keyed by the file's sha256: outside the
# repository, so every clone and every queued DVC experiment (each runs in its own temporary
# workspace) converts a model once, as the hub's own cache does. `SAFEDPO_CACHE` moves it.
def model_cache() -> Path:
    return Path(os.environ.get("SAFEDPO_CACHE") or Path.home() / ".cache" / "safedpo")


REF_DIR = Path("data/ref_logps")
REF_TRAIN = REF_DIR / "train.parquet"
REF_TEST = REF_DIR / "test.parquet"

POLICY_DIR = Path("data/policy")
# Resumable training state lives outside every declared out so the DVC cache never copies it.
CHECKPOINT_DIR = Path("data/checkpoints/train")
DVCLIVE_DIR = Path("dvclive")

GENERATIONS_DIR = Path("data/generations")

JUDGE_DIR = Path("data/judge")

SUITES_DIR = Path("data/suites")
SUITES_PROMPTS = SUITES_DIR / "prompts.parquet"
SUITES_RECORD = SUITES_DIR / "suites.json"

EVAL_DIR = Path("data/eval")
EVAL_METRICS = EVAL_DIR / "metrics.json"
EVAL_SCORES = EVAL_DIR / "scores.parquet"
EVAL_PLOTS = EVAL_DIR / "plots"
EVAL_TRADEOFF = EVAL_PLOTS / "tradeoff.json"
EVAL_CATEGORIES = EVAL_PLOTS / "categories.json"

THEORY_DIR = Path("data/theory")
THEORY_CURVES = THEORY_DIR / "curves.parquet"
THEORY_METRICS = THEORY_DIR / "metrics.json"
THEORY_PLOT = THEORY_DIR / "convergence.png"

MODEL_TAGS = ("sft", "policy")


def generations_path(tag: str) -> Path:
    """Generations of the model tagged `tag` (`sft` or `policy`)."""
    if tag not in MODEL_TAGS:
        raise ValueError(f"unknown model tag {tag!r}; expected one of {MODEL_TAGS}")
    return GENERATIONS_DIR / f"{tag}.parquet"


def model_dir(tag: str) -> Path:
    """The HF model directory behind a model tag."""
    if tag not in MODEL_TAGS:
        raise ValueError(f"unknown model tag {tag!r}; expected one of {MODEL_TAGS}")
    return SFT_DIR if tag == "sft" else POLICY_DIR

# `safedpo compare`: the table of its DVC experiments (a report, not a stage's out).
RESULTS_DIR = Path("data/results")
RESULTS_TABLE = RESULTS_DIR / "results.parquet"
RESULTS_MARKDOWN = RESULTS_DIR / "results.md"
RESULTS_PLOT = RESULTS_DIR / "tradeoff.png"
