"""The preference recipe (stage `train`): SafeDPO and the DPO baselines of
`pipeline.objectives`. Selected pairs become `PreferenceExample`s (tokenized, with their
reference log-probs and safety flags), `preference_batch` pads chosen and rejected together,
`PreferenceLoss` is the objective's loss on a batch, and `run_preference` trains the SFT model
through `training.train_loop` and saves the policy.

No reference model is loaded: its log-probs come from the `ref_logps` stage, checked against
the current fingerprint. Nothing written holds a wall-clock figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel

from pipeline import objectives
from pipeline.config import LoraConfig, TrainConfig
from pipeline.encoding import Encoded, Encoder, TruncationStats, load_template
from pipeline.errors import UserError
from pipeline.lm_head import head_path
from pipeline.logps import ForwardLayout, forward_layout
from pipeline.modeling import (
    check_saved,
    check_weights,
    disable_dropout,
    load_saved,
    max_abs_weight,
    save_model,
    stored_dtype,
)
from pipeline.objectives import Objective
from pipeline.reference import attach_reference, fingerprint_for, read_reference
from pipeline.sharding import active, load_sharded
from pipeline.training import Checkpointer, Metrics, make_accelerator, run_key, train_loop


@dataclass(frozen=True)
class PreferenceExample:
    """A selected pair, tokenized, with its reference log-probs and safety flags."""

    chosen: Encoded
    rejected: Encoded
    ref_chosen: float
    ref_rejected: float
    h_chosen: bool
    h_rejected: bool


def preference_batch(items: list[PreferenceExample], pad_id: int, layout: ForwardLayout
                     ) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences collated together, so one forward pass serves both."""
    seqs = layout.collate([e.chosen for e in items] + [e.rejected for e in items], pad_id)
    return {
        **seqs,
        "ref_chosen": torch.tensor([e.ref_chosen for e in items], dtype=torch.float32),
        "ref_rejected": torch.tensor([e.ref_rejected for e in items], dtype=torch.float32),
        "h_chosen": torch.tensor([e.h_chosen for e in items]),
        "h_rejected": torch.tensor([e.h_rejected for e in items]),
    }


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss of one objective (`pipeline.objectives`) on a batch of pairs."""

    objective: Objective
    beta: float
    delta: float
    layout: ForwardLayout

    def __call__(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, Metrics]:
        logps, _ = self.layout.logps(model, batch)
        n = batch["ref_chosen"].shape[0]
        chosen, rejected = logps[:n], logps[n:]
        losses, r_c, r_r = self.objective.loss(
            chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], batch["h_chosen"],
            batch["h_rejected"], self.beta, self.delta)
        return losses.mean(), {
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (r_c > r_r).float().mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }


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


@dataclass(frozen=True)
class PreferenceDirs:
    """Where a preference run reads (the SFT model, its reference log-probs) and writes (the
    policy; the DVCLive folder and resumable checkpoints, each optional)."""

    sft: Path
    reference: Path
    out: Path
    live: Path | None = None
    checkpoints: Path | None = None


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
    cfg: TrainConfig, train: pd.DataFrame, dirs: PreferenceDirs, *, beta: float, delta: float,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Preference-train the SFT model (`dirs.sft`) on `train` pairs for `cfg.objective` and
    save the policy to `dirs.out`; no reference model is loaded: its log-probs come from
    `dirs.reference`, checked against the current fingerprint. The weights train in fp32
    whatever dtype the SFT checkpoint has. `stop_after` ends the run after that many steps,
    leaving only its checkpoint (what a killed run leaves, for the tests)."""
    sft_dir = dirs.sft
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
    ref = read_reference(dirs.reference, fp)
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
    key = run_key("pref", asdict(cfg), beta, delta, fp.as_dict(), *(["fsdp2"] * sharded))
    # Every logged row, saved with each checkpoint: on resume DVCLive's files are rebuilt from
    # it, whatever a kill left in them (an empty metrics.json, a cut .tsv row, rows of steps
    # after the checkpoint).
    history: list[dict[str, float]] = []
    checkpointer = Checkpointer(dirs.checkpoints, key, cfg.checkpoint_every,
                                notes=lambda: {"log": history})
    if checkpointer.resumable_step():
        history.extend(checkpointer.resumed_notes().get("log", []))
    live = None
    if accelerator.is_main_process and dirs.live is not None:
        live = _open_live(dirs.live, history)

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
            save_model(model.merge_and_unload(), tokenizer, encoder.template, dirs.out, notes,
                       dtype=dtype)
        else:
            save_model(model, tokenizer, encoder.template, dirs.out, notes,
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
