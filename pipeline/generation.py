"""Batched generation on the test prompts: left padding, KV cache, greedy or sampled."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import GenerateConfig
from pipeline.modeling import prompt_ids

GENERATION_COLUMNS = ["prompt_id", "prompt", "model", "sample", "response", "n_tokens",
                      "finish_reason"]


def select_prompts(pairs: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A deterministic subset of `n` distinct test prompts, ordered by a seeded hash of their
    id, so every model is evaluated on the same prompts whatever the row order of the file."""
    prompts = pairs.drop_duplicates("prompt_id")[["prompt_id", "prompt"]]
    key = prompts["prompt_id"].map(
        lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    return prompts.assign(_k=key).sort_values("_k").head(n).drop(columns="_k") \
        .reset_index(drop=True)


@dataclass(frozen=True)
class GenerationStats:
    seconds: float
    new_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: pd.DataFrame,
    cfg: GenerateConfig, tag: str, device: str = "cpu",
) -> tuple[pd.DataFrame, GenerationStats]:
    """Responses of `model` to `prompts` (`prompt_id`, `prompt`), `cfg.samples_per_prompt` each.

    Prompts are length-sorted into batches and left-padded, so every row of a batch generates
    from the same position with the KV cache. Sampling draws from a generator seeded by
    `cfg.seed`, forked so the global torch RNG is left as it was.
    """
    model.eval()
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else None,
        top_p=cfg.top_p if cfg.do_sample else None, top_k=None,
        num_return_sequences=cfg.samples_per_prompt, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    ids = prompt_ids(tokenizer, prompts["prompt"].tolist())
    order = np.argsort([len(x) for x in ids], kind="stable")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows: list[dict[str, object]] = []
    new_tokens = 0
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.device(device)]):
        torch.manual_seed(cfg.seed)
        for start in tqdm(range(0, len(order), cfg.batch_size), desc=f"generate {tag}",
                          unit="batch"):
            idx = order[start:start + cfg.batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                attn[row, width - len(ids[i]):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                                 generation_config=gen_cfg)
            new = out[:, width:].cpu()
            for j in range(new.shape[0]):
                i = idx[j // cfg.samples_per_prompt]
                toks = new[j].tolist()
                finish = "length"
                if eos in toks:
                    toks = toks[:toks.index(eos)]
                    finish = "eos"
                new_tokens += len(toks) + (finish == "eos")
                rows.append({
                    "prompt_id": prompts["prompt_id"].iat[i], "prompt": prompts["prompt"].iat[i],
                    "model": tag, "sample": j % cfg.samples_per_prompt,
                    "response": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                    "n_tokens": len(toks), "finish_reason": finish,
                })
    stats = GenerationStats(seconds=time.perf_counter() - t0, new_tokens=new_tokens)
    df = pd.DataFrame(rows, columns=GENERATION_COLUMNS).sort_values(["prompt_id", "sample"])
    df["sample"] = df["sample"].astype(np.int32)
    df["n_tokens"] = df["n_tokens"].astype(np.int32)
    return df.reset_index(drop=True), stats
