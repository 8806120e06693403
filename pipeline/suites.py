"""Prompt suites: held-out prompts that `generate` answers and `evaluate` scores beside the test
pairs' own prompts (docs/evaluation.md).

A suite is one `suites:` entry of params.yaml: a source (`builtin:redteam`, `builtin:overrefusal`,
the shipped `builtin:harmbench` and `builtin:strongreject`, a local .jsonl/.json/.csv/.parquet
file, or a hub data set at a pinned revision; fetched by `pipeline.suite_sources.fetch_suite`)
and a layout that maps its columns onto `SUITE_COLUMNS`:

==========  ===================  ===============================================  ===========
layout      prompt column        should_refuse                                    category
==========  ===================  ===============================================  ===========
generic     prompt               column `should_refuse` (true/false, 1/0, yes/no)  category
xstest      prompt               `label` unsafe/safe, else `type` contrast_*       type
harmbench   Behavior / behavior  true                                             SemanticCat.
advbench    goal                 true                                             (none)
redteam     prompt               true                                             category
==========  ===================  ===============================================  ===========

`auto` picks xstest for a `label` + `type` file, harmbench for a `Behavior` column, advbench for
`goal`, else generic. The harmbench layout prompts a contextual behaviour as HarmBench does, its
`ContextString` first (`harmbench_prompt`), and leaves out the copyright behaviours
(`FunctionalCategory` copyright), counted with the reason under `excluded` in the record.
Rows a layout leaves unlabelled take the suite's `should_refuse` param
(null: unknown, scored for harm but not for over-refusal). A `source` column, where present, is
kept. Prompts are stripped; empty ones are refused with their row number; duplicates are kept
once (counted in the record). `prompt_id` hashes the suite name with the prompt, so a prompt in
two suites has two ids and every id is unique across the pipeline.
"""

from __future__ import annotations

import hashlib
from typing import Any, get_args, get_type_hints

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.artifacts import frame_hash
from pipeline.config import SuiteConfig
from pipeline.errors import UserError

SUITE_COLUMNS = ["suite", "prompt_id", "prompt", "should_refuse", "category", "source"]
SUITE_SCHEMA = pa.schema([
    ("suite", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("should_refuse", pa.bool_()), ("category", pa.string()), ("source", pa.string()),
])
#: The suite name of the test pairs' own prompts in generations and scores.
TEST_SUITE = "test"
LAYOUTS = tuple(a for a in get_args(get_type_hints(SuiteConfig)["layout"]) if a != "auto")

_PROMPT = {"generic": ("prompt",), "xstest": ("prompt",), "harmbench": ("Behavior", "behavior"),
           "advbench": ("goal",), "redteam": ("prompt",)}
_CATEGORY = {"generic": ("category",), "xstest": ("type",),
             "harmbench": ("SemanticCategory", "semantic_category", "category"),
             "advbench": (), "redteam": ("category",)}
_TRUE = {"true", "1", "yes", "y", "unsafe", "refuse"}
_FALSE = {"false", "0", "no", "n", "safe", "comply", "answer"}


HARMBENCH_COPYRIGHT_REASON = (
    "HarmBench scores copyright behaviours by hashing the generation against the copyrighted "
    "text (MinHash), not by judging harm; neither the judge nor a refusal rule measures them")


def harmbench_prompt(behavior: str, context: str | None) -> str:
    """A HarmBench test case as HarmBench writes it: a contextual behaviour's context, a
    separator, then the request (upstream `baselines/direct_request/direct_request.py` and the
    GCG baselines: f"{context_str}\\n\\n---\\n\\n{behavior}"); a standard one is the behaviour."""
    return f"{context}\n\n---\n\n{behavior}" if context else behavior


def suite_prompt_id(suite: str, prompt: str) -> str:
    return "s" + hashlib.sha256(f"{suite}\x00{prompt}".encode()).hexdigest()[:23]


def detect_layout(columns: list[str]) -> str:
    cols = set(columns)
    if {"label", "type", "prompt"} <= cols:
        return "xstest"
    if cols & {"Behavior", "behavior"}:
        return "harmbench"
    if "goal" in cols:
        return "advbench"
    return "generic"


def _first(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in df.columns), None)


def _flag(value: Any, where: str) -> bool | None:
    """A should_refuse label from a bool, 0/1 or a word; null stays null."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UserError(f"{where}: {value!r} is not a should_refuse label (true/false, 1/0, "
                    "yes/no, unsafe/safe)")


def _should_refuse(df: pd.DataFrame, layout: str, cfg: SuiteConfig) -> list[bool | None]:
    if layout in ("harmbench", "advbench", "redteam"):
        return [True] * len(df)
    if layout == "xstest":
        # XSTest: `label` is safe/unsafe in v2; older files only mark unsafe prompts by a
        # `contrast_` type.
        if "label" in df.columns:
            return [_flag(v, f"suite {cfg.name} row {i + 1}, label")
                    for i, v in enumerate(df["label"])]
        return [str(t).startswith("contrast") for t in df["type"]]
    if "should_refuse" in df.columns:
        labels = [_flag(v, f"suite {cfg.name} row {i + 1}, should_refuse")
                  for i, v in enumerate(df["should_refuse"])]
        return [cfg.should_refuse if v is None else v for v in labels]
    return [cfg.should_refuse] * len(df)


def map_layout(raw: pd.DataFrame, cfg: SuiteConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Raw suite rows -> `SUITE_COLUMNS` (deduplicated, capped), and what was done."""
    layout = detect_layout(list(raw.columns)) if cfg.layout == "auto" else cfg.layout
    prompt_col = cfg.prompt_column or _first(raw, _PROMPT[layout])
    if prompt_col is None or prompt_col not in raw.columns:
        want = cfg.prompt_column or " or ".join(_PROMPT[layout])
        raise UserError(f"suite {cfg.name}: no prompt column {want!r} (layout {layout}); it has "
                        f"{list(raw.columns)}; set prompt_column")
    prompts = raw[prompt_col]
    bad = [i + 1 for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise UserError(f"suite {cfg.name}: {len(bad)} row(s) without a prompt text in column "
                        f"{prompt_col!r} (first: row {bad[0]})")
    n_read = len(raw)
    excluded: dict[str, Any] = {}
    if layout == "harmbench":
        raw, prompts, excluded = _harmbench(raw, prompts)
    cat_col = _first(raw, _CATEGORY[layout])
    df = pd.DataFrame({
        "suite": cfg.name,
        "prompt": prompts.str.strip().to_numpy(),
        "should_refuse": pd.array(_should_refuse(raw, layout, cfg), dtype="boolean"),
        "category": raw[cat_col].map(lambda v: None if v is None or v != v else str(v))
        .to_numpy() if cat_col else None,
        "source": raw["source"].astype("string").to_numpy() if "source" in raw.columns
        else cfg.source,
    })
    n_rows = len(df)
    df = df.drop_duplicates("prompt", keep="first")
    n_unique = len(df)
    df["prompt_id"] = [suite_prompt_id(cfg.name, p) for p in df["prompt"]]
    if cfg.max_prompts is not None and len(df) > cfg.max_prompts:
        # A seeded hash order, as for the test prompts: the same prompts whatever the file order.
        key = df["prompt_id"].map(lambda pid: hashlib.sha256(f"{cfg.seed}:{pid}".encode())
                                  .hexdigest())
        df = df.assign(_k=key).sort_values("_k").head(cfg.max_prompts).drop(columns="_k")
    df = df.sort_values("prompt_id")[SUITE_COLUMNS].reset_index(drop=True)
    info: dict[str, Any] = {"hash": frame_hash(df, SUITE_COLUMNS), "layout": layout,
                            "prompt_column": prompt_col, "category_column": cat_col,
                            "rows": n_read, "excluded": excluded,
                            "duplicates_dropped": n_rows - n_unique, "prompts": len(df)}
    flags = df["should_refuse"]
    info.update(should_refuse=int((flags == True).sum()),  # noqa: E712 (nullable booleans)
                should_answer=int((flags == False).sum()),  # noqa: E712
                unlabelled=int(flags.isna().sum()))
    return df, info


def _harmbench(raw: pd.DataFrame, prompts: pd.Series
               ) -> tuple[pd.DataFrame, pd.Series, dict[str, Any]]:
    """HarmBench rows without the copyright behaviours, and their prompts with any context."""
    excluded: dict[str, Any] = {}
    if "FunctionalCategory" in raw.columns:
        copyright = (raw["FunctionalCategory"] == "copyright").to_numpy(dtype=bool)
        if copyright.any():
            excluded["copyright"] = {"count": int(copyright.sum()),
                                     "reason": HARMBENCH_COPYRIGHT_REASON}
        raw, prompts = raw[~copyright].reset_index(drop=True), prompts[~copyright]
    if "ContextString" in raw.columns:
        contexts = [c if isinstance(c, str) else None for c in raw["ContextString"]]
        prompts = pd.Series([harmbench_prompt(b, c) for b, c in zip(prompts, contexts,
                                                                   strict=True)])
    return raw, prompts.reset_index(drop=True), excluded


def combine(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """All suites in one table, keyed by `prompt_id` (empty with its columns if none)."""
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SUITE_COLUMNS})
    return pd.concat(frames, ignore_index=True)
