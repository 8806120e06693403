"""The two training recipes: supervised fine-tuning and preference training (SafeDPO / DPO).

Each reads typed config, builds examples, runs `training.train_loop` and saves an HF directory.
Stages call these; tests call them directly on tiny data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import LoraConfig, ModelConfig, SFTConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.logps import score_sequences
from pipeline.modeling import BUILTIN_TINY, encode_many, initial_model, load_pretrained, save_model
from pipeline.reference import attach_reference, fingerprint_for, read_reference
from pipeline.selection import select_pairs
from pipeline.training import (
    Checkpointer,
    PreferenceExample,
    PreferenceLoss,
    make_accelerator,
    preference_batch,
    sft_batch,
    sft_loss,
    train_loop,
)

SUMMARY_FILE = "training_summary.json"


def _run_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_texts(pairs: pd.DataFrame, which: str) -> tuple[list[str], list[str]]:
    """(prompts, responses) to imitate. `both` takes both responses of each pair."""
    if which == "both":
        return (pairs["prompt"].tolist() * 2,
                pairs["response_0"].tolist() + pairs["response_1"].tolist())
    if which == "safe":
        parts = [pairs.loc[~pairs[f"unsafe_{i}"], ["prompt", f"response_{i}"]]
                 .set_axis(["prompt", "response"], axis=1) for i in (0, 1)]
        both = pd.concat(parts, ignore_index=True)
        return both["prompt"].tolist(), both["response"].tolist()
    idx = pairs["better_id" if which == "better" else "safer_id"].to_numpy()
    resp = np.where(idx == 0, pairs["response_0"], pairs["response_1"])
    return pairs["prompt"].tolist(), resp.tolist()


def heldout_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 pairs: pd.DataFrame, which: str, max_length: int, device: str) -> float:
    """Mean NLL per response token on `pairs` (the test split)."""
    prompts, responses = sft_texts(pairs, which)
    enc = encode_many(tokenizer, prompts, responses, max_length)
    logps, ntok = score_sequences(model, enc, tokenizer.pad_token_id, 64, device,
                                  desc="held-out loss")
    return float(-logps.sum() / max(1, ntok.sum()))


def run_sft(
    model_cfg: ModelConfig, cfg: SFTConfig, train: pd.DataFrame, test: pd.DataFrame,
    out_dir: Path, stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune on the train responses (or pass a given model through) and save to `out_dir`.

    SFT is not checkpointed (it takes seconds on the toy default); `train` is resumable."""
    if not cfg.enabled:
        if model_cfg.name == BUILTIN_TINY:
            raise UserError("sft.enabled: false passes a given model through, but model.name is "
                            "builtin:tiny (an untrained model); enable SFT or name a model")
        model, tokenizer = load_pretrained(model_cfg.name, revision=model_cfg.revision,
                                           trust_remote_code=model_cfg.trust_remote_code)
        save_model(model, tokenizer, out_dir)
        summary = {"enabled": False, "source": model_cfg.name}
        (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    prompts, responses = sft_texts(train, cfg.responses)
    # The tiny tokenizer learns from exactly what it will see: templated prompts and responses.
    corpus = [f"User: {p}\nAssistant: {r}" for p, r in zip(prompts, responses, strict=True)]
    model, tokenizer = initial_model(model_cfg, corpus)
    accelerator = make_accelerator(cfg)
    device = str(accelerator.device)
    model.to(accelerator.device)
    before = heldout_loss(model, tokenizer, test, cfg.responses, cfg.max_length, device)
    examples = encode_many(tokenizer, prompts, responses, cfg.max_length)
    history: list[dict[str, float]] = []

    def log(step: int, metrics: dict[str, float]) -> None:
        if step % cfg.log_every == 0:
            history.append({"step": step, **metrics})

    key = _run_key("sft", asdict(model_cfg), asdict(cfg), len(examples))
    model, result = train_loop(
        model, examples, lambda b: sft_batch(b, tokenizer.pad_token_id), sft_loss, cfg,
        accelerator, Checkpointer(None, key, every=10**9), log, stop_after)
    after = heldout_loss(model, tokenizer, test, cfg.responses, cfg.max_length, device)
    summary = {
        "enabled": True, "examples": len(examples), "steps": result.steps,
        "seconds": round(result.seconds, 2), "train_loss": result.last_metrics.get("loss"),
        "heldout_loss_before": before, "heldout_loss_after": after,
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
    }
    if accelerator.is_main_process:
        save_model(model, tokenizer, out_dir, state_dict=result.state_dict)
        (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def preference_examples(
    selected: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[PreferenceExample]:
    chosen = encode_many(tokenizer, selected["prompt"].tolist(), selected["chosen"].tolist(),
                         max_length)
    rejected = encode_many(tokenizer, selected["prompt"].tolist(),
                           selected["rejected"].tolist(), max_length)
    return [
        PreferenceExample(c, r, float(rc), float(rr), bool(hc), bool(hr))
        for c, r, rc, rr, hc, hr in zip(
            chosen, rejected, selected["ref_chosen"], selected["ref_rejected"],
            selected["h_chosen"], selected["h_rejected"], strict=True)
    ]


def _apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PreTrainedModel:
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise UserError("train.lora.enabled needs peft: pip install 'safedpo[lora]'") from None
    return get_peft_model(model, PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))


def run_preference(
    cfg: TrainConfig, beta: float, delta: float, sft_dir: Path, train: pd.DataFrame,
    ref_path: Path, out_dir: Path, live_dir: Path | None, checkpoint_root: Path | None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Preference-train the SFT model on `train` pairs for `cfg.objective`; no reference model
    is loaded: its log-probs come from `ref_path`, checked against the current fingerprint."""
    model, tokenizer = load_pretrained(sft_dir)
    fp = fingerprint_for(sft_dir, tokenizer, cfg.max_length, train)
    ref = read_reference(ref_path, fp)
    selected, counts = select_pairs(train, cfg.objective)
    selected = attach_reference(selected, ref)
    examples = preference_examples(selected, tokenizer, cfg.max_length)
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg.lora)
    accelerator = make_accelerator(cfg)
    key = _run_key("pref", asdict(cfg), beta, delta, fp.as_dict())
    checkpointer = Checkpointer(checkpoint_root, key, cfg.checkpoint_every)
    resumed = checkpointer.resumable_step()
    live = None
    if accelerator.is_main_process and live_dir is not None:
        live = _open_live(live_dir, resumed)

    def log(step: int, metrics: dict[str, float]) -> None:
        if live is not None:
            for k, v in metrics.items():
                live.log_metric(k, v)
            live.next_step()

    loss_fn = PreferenceLoss(beta=beta, delta=delta, objective=cfg.objective)
    model, result = train_loop(
        model, examples, lambda b: preference_batch(b, tokenizer.pad_token_id), loss_fn, cfg,
        accelerator, checkpointer, log, stop_after)
    summary = {
        "objective": cfg.objective, "beta": beta, "delta": delta,
        "pairs_in": counts.n_in, "pairs_kept": counts.kept, "pairs_swapped": counts.swapped,
        "pairs_dropped": counts.dropped, "pairs_trained": len(examples),
        "steps": result.steps, "resumed_from_step": result.resumed_from,
        "train_seconds": round(result.seconds, 2),
    }
    # A run cut short by `stop_after` stands for a killed one: it leaves only its checkpoint.
    if accelerator.is_main_process and stop_after is None:
        if cfg.lora.enabled:
            # Merging needs the whole model on one process: LoRA is for single / DDP runs.
            save_model(model.merge_and_unload(), tokenizer, out_dir)
        else:
            save_model(model, tokenizer, out_dir, state_dict=result.state_dict)
        (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(
            {**summary, "final": result.last_metrics}, indent=2))
        checkpointer.clear(accelerator)
    if live is not None:
        for k, v in summary.items():
            live.summary[k] = v
        live.make_summary()
        live.end()
    return {**summary, "final": result.last_metrics}


def _open_live(live_dir: Path, resumed_step: int):  # -> dvclive.Live
    from dvclive import Live

    live_dir = Path(live_dir)
    if resumed_step:
        _truncate_live(live_dir, resumed_step)
    live = Live(str(live_dir), resume=bool(resumed_step), dvcyaml=False, save_dvc_exp=False,
                report=None)
    if resumed_step:
        live.step = resumed_step
    return live


def _truncate_live(live_dir: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so no step appears twice."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        df = pd.read_csv(tsv, sep="\t")
        df[df["step"] < step].to_csv(tsv, sep="\t", index=False)
