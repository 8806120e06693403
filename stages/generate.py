"""DVC stage `generate@{sft,policy}`: responses of one model to the test prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import paths
from pipeline.artifacts import read_parquet, write_parquet
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.generation import generate, select_prompts
from pipeline.modeling import load_pretrained


def run(params_file: Path = paths.PARAMS, tag: str = "policy") -> None:
    if tag not in paths.MODEL_TAGS:
        raise UserError(f"unknown model {tag!r}; expected one of {list(paths.MODEL_TAGS)}")
    params = load_params(params_file)
    cfg = params.generate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(paths.model_dir(tag))
    model.to(device)
    prompts = select_prompts(read_parquet(paths.PAIRS_TEST, ["prompt_id", "prompt"]),
                             cfg.n_prompts, cfg.seed)
    df, stats = generate(model, tokenizer, prompts, cfg, tag, device)
    out = paths.generations_path(tag)
    write_parquet(df, out, metadata={"tokens_per_second": stats.tokens_per_second,
                                     "seconds": stats.seconds})
    eos = (df["finish_reason"] == "eos").mean()
    print(f"generate {tag}: {len(df)} responses to {len(prompts)} prompts, "
          f"{stats.new_tokens} tokens in {stats.seconds:.1f}s "
          f"({stats.tokens_per_second:.0f} tokens/s), {eos:.0%} ended with EOS -> {out}")
