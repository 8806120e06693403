"""DVC stage `generate@{sft,policy}`: responses of one model to the test prompts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.artifacts import read_parquet, write_parquet
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.generation import (
    GENERATION_SCHEMA,
    eos_token_ids,
    generate,
    generation_record,
    select_prompts,
)
from pipeline.modeling import load_for_scoring
from pipeline.precision import device, weight_dtype
from pipeline.suites import TEST_SUITE
from pipeline.support import share


def run(params_file: Path = paths.PARAMS, tag: str = "policy") -> None:
    if tag not in paths.MODEL_TAGS:
        raise UserError(f"unknown model {tag!r}; expected one of {list(paths.MODEL_TAGS)}")
    params = load_params(params_file)
    cfg = params.generate
    on = device()
    model_dir = paths.model_dir(tag)
    model, encoder = load_for_scoring(model_dir, "sft" if tag == "sft" else "train",
                                      dtype=weight_dtype(params.model.dtype),
                                      max_length=params.train.max_length, device=on)
    # The test pairs' prompts (in distribution) and every held-out suite's, in one pass.
    test = select_prompts(read_parquet(paths.PAIRS_TEST, ["prompt_id", "prompt"]),
                          cfg.n_prompts, cfg.seed).assign(suite=TEST_SUITE)
    suites = read_parquet(paths.SUITES_PROMPTS, ["suite", "prompt_id", "prompt"])
    prompts = pd.concat([test, suites[["suite", "prompt_id", "prompt"]]], ignore_index=True)
    df, stats = generate(model, encoder, prompts, cfg, tag, on, params.train.mixed_precision)
    out = paths.generations_path(tag)
    # Throughput goes to the log only: a cached out must not change between identical reruns.
    write_parquet(df, out, schema=GENERATION_SCHEMA,
                  metadata=generation_record(cfg, eos_token_ids(model, encoder)))
    eos = share(int((df["finish_reason"] == "eos").sum()), len(df))
    print(f"generate {tag}: {len(df)} responses to {len(prompts)} prompts "
          f"({len(test)} test, {len(suites)} from suites), "
          f"{stats.new_tokens} tokens in {stats.seconds:.1f}s "
          f"({stats.tokens_per_second:.0f} tokens/s), {eos} ended with EOS -> {out}")
    if stats.truncation.truncated:
        print(f"generate {tag}: {stats.truncation.describe('prompts')} to leave "
              f"max_new_tokens {cfg.max_new_tokens} within train.max_length "
              f"{params.train.max_length}")
