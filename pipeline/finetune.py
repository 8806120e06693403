"""The two training recipes: supervised fine-tuning and preference training (SafeDPO / DPO).

Each reads typed config, builds examples through the one `Encoder`, runs
`training.train_loop` and saves an HF directory (safetensors + tokenizer + prompt template).
Stages call these; tests call them directly on tiny data. Nothing written here holds a
wall-clock figure: reruns give byte-identical outs; timings are returned for the stage log.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel

from pipeline import objectives
from pipeline.config import LoraConfig, ModelConfig, SFTConfig, TrainConfig
from pipeline.encoding import (
    Encoder,
    TruncationStats,
    load_template,
    resolve_template,
    template_corpus,
)
from pipeline.errors import UserError
from pipeline.gguf import converted, is_gguf
from pipeline.lm_head import head_path
from pipeline.logps import forward_layout, score_sequences
from pipeline.modeling import (
    BUILTIN_TINY,
    check_saved,
    check_weights,
    disable_dropout,
    initial_model,
    load_pretrained,
    load_saved,
    max_abs_weight,
    save_model,
    stored_dtype,
)
from pipeline.precision import save_dtype
from pipeline.reference import attach_reference, fingerprint_for, read_reference
from pipeline.selection import contradictions, oriented, responses_long
from pipeline.sharding import active, load_sharded, shard
from pipeline.training import (
    Checkpointer,
    PreferenceExample,
    PreferenceLoss,
    SFTLoss,
    make_accelerator,
    preference_batch,
    train_loop,
)


def _run_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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

    key = _run_key("sft", asdict(model_cfg), asdict(cfg), len(examples))
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


def preference_examples(selected: pd.DataFrame, encoder: Encoder,
                        stats: TruncationStats | None = None) -> list[PreferenceExample]:
    pairs = encoder.pairs(selected["prompt"].tolist(), selected["chosen"].tolist(),
                          selected["rejected"].tolist(), stats)
    return [
        PreferenceExample(c, r, float(rc), float(rr), bool(hc), bool(hr))
        for (c, r), rc, rr, hc, hr in zip(
            pairs, selected["ref_chosen"], selected["ref_rejected"],
            selected["h_chosen"], selected["h_rejected"], strict=True)
    ]


def _apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PreTrainedModel:
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise UserError("train.lora.enabled needs peft: pip install 'safedpo[lora]'") from None
    try:
        return get_peft_model(model, PeftLoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise UserError(f"parameter train.lora.target_modules: {list(cfg.target_modules)} "
                        f"({str(exc).splitlines()[0][:120]}); this model's linear layers are "
                        f"{names}") from None


def run_preference(
    cfg: TrainConfig, beta: float, delta: float, sft_dir: Path, train: pd.DataFrame,
    ref_path: Path, out_dir: Path, live_dir: Path | None, checkpoint_root: Path | None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Preference-train the SFT model on `train` pairs for `cfg.objective`; no reference model
    is loaded: its log-probs come from `ref_path`, checked against the current fingerprint.
    The weights train in fp32 whatever dtype the SFT checkpoint has."""
    objective = objectives.get(cfg.objective)
    # First: under a launcher it sets up the process group that sharded loading uses.
    accelerator = make_accelerator(cfg)
    sharded = active(cfg.sharding, accelerator.num_processes)
    if sharded:
        check_saved(sft_dir, "sft")
        model, tokenizer = load_sharded(sft_dir, accelerator.device)
    else:
        model, tokenizer = load_saved(sft_dir, "sft", dtype=torch.float32)
    # Saved in the SFT model's dtype (model.save_dtype chose it), though trained in fp32.
    dtype = stored_dtype(sft_dir)
    encoder = Encoder(tokenizer, load_template(sft_dir), cfg.max_length)
    encoder.require_room("train.max_length")
    fp = fingerprint_for(sft_dir, encoder, cfg.mixed_precision, train, accelerator.device)
    ref = read_reference(ref_path, fp)
    selected, counts = objectives.select_pairs(train, objective)
    selected = attach_reference(selected, ref)
    truncation = TruncationStats()
    examples = preference_examples(selected, encoder, truncation)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg.lora)
    start = max_abs_weight(model)
    # A sharded checkpoint (`sharding.ShardedState`) is not accelerate's: neither reads the
    # other, so a run that shards never resumes one that did not, nor the reverse.
    key = _run_key("pref", asdict(cfg), beta, delta, fp.as_dict(), *(["fsdp2"] * sharded))
    # Every logged row, saved with each checkpoint: on resume DVCLive's files are rebuilt from
    # it, whatever a kill left in them (an empty metrics.json, a cut .tsv row, rows of steps
    # after the checkpoint).
    history: list[dict[str, float]] = []
    checkpointer = Checkpointer(checkpoint_root, key, cfg.checkpoint_every,
                                notes=lambda: {"log": history})
    if checkpointer.resumable_step():
        history.extend(checkpointer.resumed_notes().get("log", []))
    live = None
    if accelerator.is_main_process and live_dir is not None:
        live = _open_live(live_dir, history)

    def log(step: int, metrics: dict[str, float]) -> None:
        history.append(dict(metrics))
        if live is not None:
            _log_row(live, metrics)

    layout = forward_layout(cfg.layout, cfg.forward_groups, model, accelerator.device,
                            accelerator.num_processes)
    loss_fn = PreferenceLoss(objective, beta=beta, delta=delta, layout=layout)
    model, result = train_loop(
        model, examples, lambda b: preference_batch(b, tokenizer.pad_token_id, layout), loss_fn,
        cfg, accelerator, checkpointer, log, stop_after)
    summary = {
        # The SFT model this policy started from: evaluation checks it is its reference.
        "sft_model": fp.model,
        "objective": cfg.objective, "beta": beta, "delta": delta,
        "pairs_in": counts.n_in, "pairs_kept": counts.kept, "pairs_swapped": counts.swapped,
        "pairs_dropped": counts.dropped, "pairs_contradictory": counts.contradictions,
        "pairs_trained": len(examples), "steps": result.steps,
    }
    # A run cut short by `stop_after` stands for a killed one: it leaves only its checkpoint.
    check_weights(model, "train", start, cfg.max_weight_growth)
    if accelerator.is_main_process and stop_after is None:
        notes = {**summary, "final": result.last_metrics}
        if cfg.lora.enabled:
            # Merging needs the whole model on one process: LoRA is for single / DDP runs.
            save_model(model.merge_and_unload(), tokenizer, encoder.template, out_dir, notes,
                       dtype=dtype)
        else:
            save_model(model, tokenizer, encoder.template, out_dir, notes,
                       state_dict=result.state_dict, dtype=dtype)
        checkpointer.clear(accelerator)
    if live is not None:
        for k, v in summary.items():
            live.summary[k] = v
        live.make_summary()
        live.end()
    return {**summary, "final": result.last_metrics, "resumed_from_step": result.resumed_from,
            "seconds": result.seconds,
            "layout": f"{layout.describe()}; log-probs from {head_path(model)}",
            "saved_dtype": str(dtype),
            "truncation_warning": truncation.warning("training pairs", "train.max_length",
                                                     cfg.max_length)}


def _open_live(live_dir: Path, history: list[dict[str, float]]):  # -> dvclive.Live
    """A fresh DVCLive logger (it deletes what an earlier run left) with the rows of `history`
    logged again: the same files, byte for byte, as the run had written up to its checkpoint."""
    from dvclive import Live

    live = Live(str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False, report=None)
    for row in history:
        _log_row(live, row)
    return live


def _log_row(live, metrics: dict[str, float]) -> None:  # live: dvclive.Live
    for k, v in metrics.items():
        live.log_metric(k, v)
    live.next_step()
