"""The supervised fine-tuning recipe (stage `sft`): the texts to imitate, the batch loss, the
held-out loss, and `run_sft`, which trains through `training.train_loop` and saves an HF
directory (safetensors + tokenizer + prompt template).

Nothing here reads objectives, losses or reference log-probs (tests/test_stage_lines.py): an
edit to a preference objective never reruns SFT. Nothing written holds a wall-clock figure:
reruns give byte-identical outs; timings are returned for the stage log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel

from pipeline.config import ModelConfig, SFTConfig
from pipeline.encoding import Encoder, TruncationStats, resolve_template, template_corpus
from pipeline.errors import UserError
from pipeline.gguf import converted, is_gguf
from pipeline.lm_head import head_path
from pipeline.logps import ForwardLayout, forward_layout, score_sequences
from pipeline.modeling import (
    BUILTIN_TINY,
    check_weights,
    initial_model,
    load_pretrained,
    max_abs_weight,
    save_model,
    stored_dtype,
)
from pipeline.precision import save_dtype
from pipeline.selection import contradictions, oriented, responses_long
from pipeline.sharding import active, load_sharded, shard
from pipeline.training import Checkpointer, Metrics, make_accelerator, run_key, train_loop


@dataclass(frozen=True)
class SFTLoss:
    """Mean negative log-likelihood per response token of the batch."""

    layout: ForwardLayout

    def __call__(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, Metrics]:
        logps, ntok = self.layout.logps(model, batch)
        loss = -logps.sum() / ntok.sum().clamp(min=1)
        return loss, {"tokens": ntok.sum().float()}


def sft_texts(pairs: pd.DataFrame, which: str) -> tuple[list[str], list[str]]:
    """(prompts, responses) to imitate. `both` takes both responses of each pair, `safe` the
    safe ones, `better`/`safer` the labelled winner (`safer` leaves contradictory pairs out)."""
    if which in ("both", "safe"):
        long = responses_long(pairs)
        if which == "safe":
            long = long[~long["unsafe"]]
        return long["prompt"].tolist(), long["response"].tolist()
    if which == "safer":
        pairs = pairs[~contradictions(pairs)]
    df = oriented(pairs, pairs[f"{which}_id"].to_numpy(dtype=np.int64))
    return df["prompt"].tolist(), df["chosen"].tolist()


def heldout_loss(model: PreTrainedModel, encoder: Encoder, pairs: pd.DataFrame, which: str,
                 device: str, mixed_precision: str) -> float:
    """Mean NLL per response token on `pairs` (the test split)."""
    prompts, responses = sft_texts(pairs, which)
    enc = encoder.sequences(prompts, responses)
    logps, ntok = score_sequences(model, enc, encoder.tokenizer.pad_token_id, 64, device,
                                  desc="held-out loss", mixed_precision=mixed_precision)
    return float(-logps.sum() / max(1, ntok.sum()))


def run_sft(
    model_cfg: ModelConfig, cfg: SFTConfig, train: pd.DataFrame, test: pd.DataFrame,
    out_dir: Path, stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune on the train responses (or pass a given model through) and save to `out_dir`
    with the resolved prompt template. Returns a summary (with `seconds`, for the log only).

    SFT is not checkpointed (it takes seconds on the toy default); `train` is resumable."""
    if not cfg.enabled:
        if model_cfg.name == BUILTIN_TINY:
            raise UserError("sft.enabled: false passes a given model through, but model.name is "
                            "builtin:tiny (an untrained model); enable SFT or name a model")
        # Saved in the checkpoint's own dtype (a 7B bf16 model stays 14 GB); training loads
        # it in fp32 whatever that dtype is.
        model, tokenizer = load_pretrained(model_cfg.name, revision=model_cfg.revision,
                                           trust_remote_code=model_cfg.trust_remote_code,
                                           dtype="auto")
        template = resolve_template(model_cfg.template, tokenizer)
        dtype = save_dtype(model_cfg.save_dtype, next(model.parameters()).dtype)
        summary = {"enabled": False, "source": model_cfg.name, "template": template.kind}
        save_model(model, tokenizer, template, out_dir, summary, dtype=dtype)
        return {**summary, "template_text": template.describe(), "saved_dtype": str(dtype)}

    prompts, responses = sft_texts(train, cfg.responses)
    # First: under a launcher it sets up the process group that sharded loading uses.
    accelerator = make_accelerator(cfg)
    sharded = active(cfg.sharding, accelerator.num_processes)
    if model_cfg.name == BUILTIN_TINY:
        # The tiny tokenizer learns from exactly what it will see: templated prompts + responses.
        template = resolve_template(model_cfg.template, None)
        model, tokenizer = initial_model(model_cfg, template_corpus(template, prompts, responses))
        if sharded:  # every process built the same seeded model
            model = shard(model, accelerator.device)
    else:
        if sharded and (is_gguf(model_cfg.name) or not model_cfg.name.startswith("builtin:")):
            source = converted(model_cfg.name) if is_gguf(model_cfg.name) else model_cfg.name
            model, tokenizer = load_sharded(source, accelerator.device,
                                            revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
        else:
            model, tokenizer = initial_model(model_cfg, [])
        template = resolve_template(model_cfg.template, tokenizer)
    encoder = Encoder(tokenizer, template, cfg.max_length)
    encoder.require_room("sft.max_length")
    device = str(accelerator.device)
    if not sharded:
        model.to(accelerator.device)
    start = max_abs_weight(model)
    before = heldout_loss(model, encoder, test, cfg.responses, device, cfg.mixed_precision)
    stats = TruncationStats()
    examples = encoder.sequences(prompts, responses, stats)
    # Training runs fp32 master weights; the result is saved in the starting checkpoint's dtype.
    dtype = save_dtype(model_cfg.save_dtype, stored_dtype(
        model_cfg.name, revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code))
    history: list[dict[str, float]] = []

    def log(step: int, metrics: dict[str, float]) -> None:
        if step % cfg.log_every == 0:
            history.append({"step": step, **metrics})

    key = run_key("sft", asdict(model_cfg), asdict(cfg), len(examples))
    layout = forward_layout(cfg.layout, cfg.forward_groups, model, accelerator.device,
                            accelerator.num_processes)
    model, result = train_loop(
        model, examples, lambda b: layout.collate(b, tokenizer.pad_token_id), SFTLoss(layout), cfg,
        accelerator, Checkpointer(None, key, every=10**9), log, stop_after)
    after = heldout_loss(model, encoder, test, cfg.responses, device, cfg.mixed_precision)
    summary = {
        "enabled": True, "examples": len(examples), "steps": result.steps,
        "train_loss": result.last_metrics.get("loss"), "template": template.kind,
        "heldout_loss_before": before, "heldout_loss_after": after,
        "truncation": stats.as_dict(),
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
    }
    check_weights(model, "sft", start, cfg.max_weight_growth)
    if accelerator.is_main_process:
        save_model(model, tokenizer, template, out_dir, summary, state_dict=result.state_dict,
                   dtype=dtype)
    return {**summary, "seconds": result.seconds,
            "layout": f"{layout.describe()}; log-probs from {head_path(model)}",
            "template_text": template.describe(), "saved_dtype": str(dtype),
            "truncation_warning": stats.warning("SFT examples", "sft.max_length",
                                                cfg.max_length)}
