"""Batched generation on the test prompts: left padding, KV cache, greedy or sampled.

Every sampling field is set from params, never from a model's `generation_config.json` (which
transformers would otherwise merge in: hub models set `top_k`, `repetition_penalty`, ...), every
EOS id of the model is honoured, and the exact prompt and generated token ids are stored, so
log-prob metrics (KL to the reference) score exactly what was sampled.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from pipeline.config import GenerateConfig, MixedPrecision
from pipeline.encoding import Encoder, TruncationStats
from pipeline.layouts import token_batches
from pipeline.precision import autocast
from pipeline.suites import TEST_SUITE

GENERATION_COLUMNS = ["suite", "prompt_id", "prompt", "model", "sample", "response", "prompt_ids",
                      "token_ids", "n_tokens", "finish_reason"]
GENERATION_SCHEMA = pa.schema([
    ("suite", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("model", pa.string()),
    ("sample", pa.int32()), ("response", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
    ("token_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("finish_reason", pa.string()),
])


def select_prompts(pairs: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A deterministic subset of `n` distinct test prompts, ordered by a seeded hash of their
    id, so every model is evaluated on the same prompts whatever the row order of the file."""
    prompts = pairs.drop_duplicates("prompt_id")[["prompt_id", "prompt"]]
    key = prompts["prompt_id"].map(
        lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    return prompts.assign(_k=key).sort_values("_k").head(n).drop(columns="_k") \
        .reset_index(drop=True)


def eos_token_ids(model: PreTrainedModel, encoder: Encoder) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and all of the model's generation
    config (chat models often end a turn with a token other than `eos_token`)."""
    ids = {encoder.eos}
    for src in (getattr(model, "generation_config", None), model.config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def generation_config(cfg: GenerateConfig, pad_id: int, eos_ids: Sequence[int]
                      ) -> GenerationConfig:
    """Exactly the decoding the params describe; every logits processor field is set, so none
    is filled from a model's defaults (at temperature 1, top_p 1, top_k 0 none applies)."""
    sample = cfg.do_sample
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, min_length=0, do_sample=sample,
        num_beams=1, temperature=cfg.temperature if sample else 1.0,
        top_p=cfg.top_p if sample else 1.0, top_k=cfg.top_k if sample else 0,
        min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=0,
        encoder_repetition_penalty=1.0, length_penalty=1.0, bad_words_ids=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, renormalize_logits=False, remove_invalid_values=False,
        num_return_sequences=cfg.samples_per_prompt, use_cache=True,
        pad_token_id=pad_id, eos_token_id=list(eos_ids),
    )


@dataclass(frozen=True)
class GenerationStats:
    seconds: float
    new_tokens: int
    truncation: TruncationStats  # prompts cut to leave max_new_tokens within max_length

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def _split_at_eos(toks: list[int], eos: set[int]) -> tuple[list[int], str]:
    """Generated ids up to and including the first EOS id, and why generation stopped."""
    for i, t in enumerate(toks):
        if t in eos:
            return toks[:i + 1], "eos"
    return toks, "length"


@torch.inference_mode()
def generate(
    model: PreTrainedModel, encoder: Encoder, prompts: pd.DataFrame, cfg: GenerateConfig,
    tag: str, device: torch.device | str = "cpu", mixed_precision: MixedPrecision = "auto",
) -> tuple[pd.DataFrame, GenerationStats]:
    """Responses of `model` to `prompts` (`prompt_id`, `prompt`, and `suite`, which defaults to
    the test prompts' suite), `cfg.samples_per_prompt` each.

    Prompts are cut by the training rule (`Encoder.generation_prompts`), length-sorted into
    batches of at most `cfg.batch_size` prompts and `cfg.max_tokens` tokens (prompt + new
    tokens, times the samples: what the KV cache grows to), and left-padded, so every row of a
    batch generates from the same position with the KV cache. Sampling draws from the torch RNG
    seeded with `cfg.seed`, forked so the global state is left as it was.
    """
    model.eval()
    tok = encoder.tokenizer
    eos_ids = eos_token_ids(model, encoder)
    gen_cfg = generation_config(cfg, tok.pad_token_id, eos_ids)
    # The model's own generation config would be merged into ours for every unset field.
    saved_cfg, model.generation_config = model.generation_config, gen_cfg
    cut = TruncationStats()
    ids = encoder.generation_prompts(prompts["prompt"].tolist(), cfg.max_new_tokens, cut)
    suites = (prompts["suite"].tolist() if "suite" in prompts else [TEST_SUITE] * len(prompts))
    order = np.argsort([len(x) for x in ids], kind="stable")
    # A row holds its prompt and the new tokens of each sample (the KV cache grows to that).
    widths = np.array([len(ids[i]) + cfg.max_new_tokens for i in order]) * cfg.samples_per_prompt
    batches = token_batches(widths, cfg.batch_size, cfg.max_tokens)
    pad, eos = tok.pad_token_id, set(eos_ids)
    rows: list[dict[str, object]] = []
    new_tokens = 0
    t0 = time.perf_counter()
    dev = torch.device(device)
    try:
        with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]), \
                autocast(mixed_precision, dev):
            torch.manual_seed(cfg.seed)
            for start, stop in tqdm(batches, desc=f"generate {tag}", unit="batch"):
                idx = order[start:stop]
                width = max(len(ids[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                    attn[row, width - len(ids[i]):] = 1
                out = model.generate(input_ids=input_ids.to(dev), attention_mask=attn.to(dev),
                                     generation_config=gen_cfg)
                new = out[:, width:].cpu()
                for j in range(new.shape[0]):
                    i = idx[j // cfg.samples_per_prompt]
                    toks, finish = _split_at_eos(new[j].tolist(), eos)
                    new_tokens += len(toks)
                    text_ids = toks[:-1] if finish == "eos" else toks
                    rows.append({
                        "suite": suites[i], "prompt_id": prompts["prompt_id"].iat[i],
                        "prompt": prompts["prompt"].iat[i], "model": tag,
                        "sample": j % cfg.samples_per_prompt,
                        "response": tok.decode(text_ids, skip_special_tokens=True).strip(),
                        "prompt_ids": ids[i], "token_ids": toks, "n_tokens": len(text_ids),
                        "finish_reason": finish,
                    })
    finally:
        model.generation_config = saved_cfg
    stats = GenerationStats(seconds=time.perf_counter() - t0, new_tokens=new_tokens,
                            truncation=cut)
    df = pd.DataFrame(rows, columns=GENERATION_COLUMNS).sort_values(
        ["suite", "prompt_id", "sample"])
    df["sample"] = df["sample"].astype(np.int32)
    df["n_tokens"] = df["n_tokens"].astype(np.int32)
    return df.reset_index(drop=True), stats


def generation_record(cfg: GenerateConfig, eos_ids: Sequence[int]) -> dict[str, object]:
    """What a generations file was made with (deterministic, stored in its metadata)."""
    return {"generate": asdict(cfg), "eos_token_ids": list(eos_ids)}
