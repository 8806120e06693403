"""Our preference-training step against TRL's `DPOTrainer`, side by side, on the same inputs.

Both frameworks train a copy of the same model (same weights) on the same pairs, in the same
batches (TRL is given our batch order through its sampler), with the same batch size, β, learning
rate (constant, no warm-up), gradient clipping, precision and `max_length`. TRL runs with
`precompute_ref_log_probs=True`, so, like ours, it holds no reference model during training.
Gradient checkpointing, on by default in `DPOConfig`, is turned off as it is in ours
(`--trl-gradient-checkpointing` turns it back on).

Identical tokenization. TRL 1.16's `DPOTrainer._prepare_dataset` always re-tokenizes text
columns (`prompt`/`chosen`/`rejected`; it has no pre-tokenized path), but its collator
(`DataCollatorForPreference`) consumes rows of `prompt_ids`, `chosen_ids` and `rejected_ids`
(token id lists; the completion ends with EOS), which is what the tokenization produces. The
benchmark subclasses `DPOTrainer` so that `_prepare_dataset` returns such a dataset unchanged:
the rows are cut from our `Encoded` sequences (the prompt is where our labels are -100, shared
by both sides of a pair), so both frameworks forward exactly the same token ids.

Timing is interleaved: the two training loops run in two threads that take turns, `--window`
optimizer steps each (ours, TRL, ours, TRL, ...), so load from other jobs hits both alike. Each
step is timed from when its loop gets the turn (after a device synchronize) to the end of its
optimizer step, i.e. batch collation, forward, backward, clipping, optimizer and each
framework's own per-step bookkeeping (TRL's metrics, ours' logging). The first `--warmup`
steps of each are not counted.

Figures: pairs/s, tokens/s (non-pad tokens), MFU (model FLOPs of fwd + bwd on the non-pad
tokens, the formula of bench/bench_train.py, the same for both since the batches are the same,
over the device's measured matmul peak in the dtype the step runs in: fp32 on CPU, bf16 under
autocast on a GPU), peak memory (GPU: `torch.cuda.max_memory_allocated`; CPU: peak RSS during
training minus RSS before the model was built) measured in a separate process per framework,
and the ratio ours / TRL. The FLOPs counted are the model's, not what each framework executes:
work one of them skips (TRL's fused LM head on CUDA projects only completion positions; ours
projects only label positions, and on CPU runs each prompt once for both responses with no
padding, `layout: shared_prompts`) shows as more pairs/s at the same FLOP count, and as an MFU
above what the hardware executes.

Agreement, checked before any update:
(a) reference log-probs: ours (`score_sequences`) against the ones TRL precomputes for the same
    token ids (every pair the run draws), on the same initial weights, in the run's precision;
(b) the DPO loss of the first batch, in fp32, both with the same reference log-probs (ours at
    step 0 plus N(0, 5²) noise, so the loss is not log 2 everywhere), our plain DPO
    (`dpo_helpful`) against TRL's `sigmoid` loss; target |Δ| ≤ 1e-4.
What is left between the two: float rounding only. TRL computes log-probs with its fused,
chunked LM head (on CUDA with Triton only at completion positions, on CPU at every position),
ours with `lm_head.LabelLogps` (the LM head only at label positions, in row chunks, an fp32
logsumexp; `ours_logps_path` in the results says which path ran), in the layout of
`logps.forward_layout` (`ours_layout`; `--layout` to choose); sums of ~100 fp32 log-probs of a
few nats differ in the last bits.

The timed step is what `train` runs (SafeDPO; its margin costs a few element-wise ops) against
TRL's sigmoid DPO. Other per-framework defaults are kept and printed: TRL's optimizer is
`adamw_torch_fused` (transformers' default), ours the fused `torch.optim.AdamW` as well.

    pip install -e '.[bench]'                            # TRL
    python bench/bench_vs_trl.py                         # GPU: 110m + 340m; CPU: tiny + 30m
    python bench/bench_vs_trl.py --config tiny --steps 3 --warmup 2
    python bench/bench_vs_trl.py --config 340m --steps 50 --json out.json
    python bench/bench_vs_trl.py --config 340m --forward-groups 2   # ours in 2 length groups
    python bench/bench_vs_trl.py --config 340m --layout shared_prompts  # ours packed, prompts once
    python bench/bench_vs_trl.py --config 30m --data pku   # long PKU-shaped pairs, max_length 512

Each configuration runs in its own process (the timed pair), plus one process per framework for
its peak memory (`--no-memory` skips those), so each peak is that framework's alone. The
defaults on a GPU (110m + 340m, batch 64, 5 + 30 steps each, memory over 3 steps) are sized to
finish within about 8 minutes on one H200, most of it process start-up, model init and TRL's
set-up (it hashes the weights and precomputes reference log-probs); the 30m config on a 2-core
CPU takes ~10 s per step per framework, so keep `--steps` small there.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from bench_train import (
    CONFIGS,
    DATA,
    DEFAULT_MAX_LENGTH,
    PRETRAINED,
    ModelShape,
    PeakRSS,
    bench_pairs,
    build,
    load_average,
    matmul_peak,
    pin_mmap_threshold,
    rss_mb,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import LayoutKind, TinyModelConfig, TrainConfig
from pipeline.encoding import IGNORE
from pipeline.lm_head import lm_head_of
from pipeline.logps import ForwardLayout, forward_layout, score_sequences
from pipeline.objectives import OBJECTIVES
from pipeline.preference import PreferenceExample, PreferenceLoss, preference_batch
from pipeline.training import (
    Checkpointer,
    Plan,
    make_accelerator,
    train_loop,
)

# GPU sizes, Llama-style, vocab 32k (the toy BPE saturates at ~2.8k tokens; `build` resizes the
# tied embedding to the full vocabulary so the LM head costs what it would on real text).
CONFIGS.update({  # `build` looks its configuration up in this dict
    "110m": TinyModelConfig(vocab_size=32768, hidden_size=768, intermediate_size=2048,
                            num_layers=12, num_heads=12, num_kv_heads=12),
    "340m": TinyModelConfig(vocab_size=32768, hidden_size=1024, intermediate_size=2816,
                            num_layers=24, num_heads=16, num_kv_heads=16),
    "1b": TinyModelConfig(vocab_size=32768, hidden_size=2048, intermediate_size=5632,
                          num_layers=18, num_heads=16, num_kv_heads=16),
})
SETS = {"cpu": ["tiny", "30m"], "gpu": ["110m", "340m"]}
DEFAULT_STEPS = {"tiny": 20, "30m": 4, "110m": 30, "340m": 30, "1b": 20, "gemma3-270m": 3}
BETA = 0.1
LOSS_TOLERANCE = 1e-4
NEED_TRL = "bench_vs_trl needs TRL: pip install -e '.[bench]'"
# Set in the child processes before anything is imported: tqdm reads TQDM_* at import, and
# TRL's trainer pings the Hub (telemetry) unless told not to.
CHILD_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Setup:
    config: str
    data: str  # bench_train.DATA
    device: str  # "cuda" | "cpu"
    precision: str  # "no" (fp32) | "bf16" (autocast, fp32 master weights)
    batch_size: int
    max_length: int
    warmup: int
    steps: int
    window: int
    pairs: int
    threads: int
    lr: float
    max_grad_norm: float
    memory_steps: int
    trl_gradient_checkpointing: bool
    forward_groups: int | None = None  # ours; None: `logps.forward_layout`'s default
    layout: str | None = None  # ours; None: `logps.forward_layout`'s default

    def ours_layout(self, model: torch.nn.Module) -> ForwardLayout:
        return forward_layout(self.layout, self.forward_groups, model, self.device)

    @property
    def total(self) -> int:
        return self.warmup + self.steps


# --- inputs shared by both frameworks -------------------------------------------------------

def our_config(s: Setup, n_examples: int, total: int) -> TrainConfig:
    spe = max(1, n_examples // s.batch_size)
    return replace(TrainConfig(), batch_size=s.batch_size, max_length=s.max_length, lr=s.lr,
                   epochs=float(math.ceil(total / spe)), warmup_ratio=0.0, schedule="constant",
                   max_grad_norm=s.max_grad_norm, mixed_precision=s.precision)


def batch_order(cfg: TrainConfig, n_examples: int, total: int) -> list[list[int]]:
    """The example indices of each of our first `total` steps; TRL is fed the same."""
    plan = Plan(n_examples, cfg.batch_size, cfg.grad_accum, 1, cfg.epochs)
    return [plan.micro_batches(step, cfg.seed, 0)[0] for step in range(total)]


def trl_rows(examples: list[PreferenceExample]) -> dict[str, list[list[int]]]:
    """Our token ids in the columns TRL's preference collator reads."""
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for e in examples:
        n = e.chosen.n_prompt_tokens
        c, r = e.chosen.input_ids, e.rejected.input_ids
        if r[:n] != c[:n] or any(t != IGNORE for t in e.rejected.labels[:n]):
            raise ValueError("a pair whose two sides do not share their prompt tokens")
        rows["prompt_ids"].append(c[:n])
        rows["chosen_ids"].append(c[n:])
        rows["rejected_ids"].append(r[n:])
    return rows


def trl_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                examples: list[PreferenceExample], batches: list[list[int]], s: Setup,
                out_dir: str, callbacks: list[Any]) -> tuple[Any, list[int]]:
    """TRL's DPOTrainer on our token ids, in our batch order, reference log-probs precomputed;
    and the indices (into `examples`) of its dataset's rows.

    Its dataset holds only the pairs that `batches` use: TRL precomputes reference log-probs
    for every row, and on CPU that would take longer than the steps timed.
    """
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    used = sorted({i for b in batches for i in b})
    row = {i: k for k, i in enumerate(used)}
    order = [row[i] for b in batches for i in b]

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset  # already what its tokenization would produce

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return order  # any sized iterable of indices is a sampler

    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1, max_steps=len(batches), learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=s.max_grad_norm, beta=BETA, loss_type=["sigmoid"],
        max_length=s.max_length, precompute_ref_log_probs=True,
        gradient_checkpointing=s.trl_gradient_checkpointing, bf16=s.precision == "bf16",
        fp16=False, use_cpu=s.device == "cpu", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = PreTokenizedDPOTrainer(
        model=model, args=args,
        train_dataset=datasets.Dataset.from_dict(trl_rows([examples[i] for i in used])),
        processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # logs every 10 steps as usual, but not to stdout
    return trainer, used


def ours_logps_path(model: PreTrainedModel) -> str:
    """Which path `logps.batch_logps` takes for `model`."""
    return ("label positions (LabelLogps)" if lm_head_of(model) is not None
            else "full logits (sequence_logps)")


def step_lengths(examples: list[PreferenceExample], batch: list[int]) -> np.ndarray:
    return np.array([len(examples[i].chosen.input_ids) for i in batch]
                    + [len(examples[i].rejected.input_ids) for i in batch])


# --- device ---------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_matmul_peak(device: str, dtype: torch.dtype) -> dict[str, float]:
    """Best matmul GFLOP/s of the device in `dtype`: bench_train's on CPU; on a GPU, large
    square matrices, each window a fixed count of products between two synchronizes."""
    if device == "cpu":
        return matmul_peak(dtype)
    out: dict[str, float] = {}
    for n in (4096, 8192):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        reps = max(5, int(0.2 / ((time.perf_counter() - t0) / 5)))
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize()
            best = max(best, reps * 2.0 * n**3 / (time.perf_counter() - t0))
        out[str(n)] = best / 1e9
        del a, b, c
    out["best"] = max(out.values())
    return out


# --- taking turns ---------------------------------------------------------------------------

class TakeTurns:
    """Two training loops in two threads, `window` optimizer steps each in turn.

    A loop calls `step_done` at the end of each optimizer step (ours from its `log` callback,
    TRL's from `on_step_end`); it then blocks until its next turn. Only one loop runs at any
    time, so each step's time is its own. A loop that has finished, or failed, hands its turn
    over for good.
    """

    def __init__(self, names: tuple[str, str], window: int, device: str) -> None:
        self.names = names
        self.window = window
        self.device = device
        self.turn = names[0]
        self.done: set[str] = set()
        self.cond = threading.Condition()
        self.seconds: dict[str, list[float]] = {n: [] for n in names}
        self.errors: dict[str, BaseException] = {}
        self._t0: dict[str, float] = {}

    def _other(self, me: str) -> str:
        return self.names[1] if me == self.names[0] else self.names[0]

    def _wait_turn(self, me: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me or self._other(me) in self.done)
        self._t0[me] = time.perf_counter()

    def step_done(self, me: str) -> None:
        synchronize(self.device)  # GPU work queued by this step belongs to this step
        self.seconds[me].append(time.perf_counter() - self._t0[me])
        if len(self.seconds[me]) % self.window == 0:
            with self.cond:
                if self._other(me) not in self.done:
                    self.turn = self._other(me)
                    self.cond.notify_all()
            self._wait_turn(me)
        else:
            self._t0[me] = time.perf_counter()

    def run(self, me: str, loop: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                self._wait_turn(me)
                loop()
            except BaseException as exc:
                self.errors[me] = exc
            finally:
                with self.cond:
                    self.done.add(me)
                    self.turn = self._other(me)
                    self.cond.notify_all()

        thread = threading.Thread(target=body, name=me, daemon=True)
        thread.start()
        return thread


# --- the timed pair (one process) -----------------------------------------------------------

def prepare(s: Setup, total: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase,
                                            list[PreferenceExample], TrainConfig,
                                            list[list[int]]]:
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    model, tokenizer, examples = build(s.config, s.data, bench_pairs(s.data, s.pairs),
                                       s.max_length, seed=0)
    cfg = our_config(s, len(examples), total)
    return model, tokenizer, examples, cfg, batch_order(cfg, len(examples), total)


def run_pair(s: Setup) -> dict[str, Any]:
    from transformers import TrainerCallback

    model, tokenizer, examples, cfg, batches = prepare(s, s.total)
    trl_model = copy.deepcopy(model)  # same weights, trained separately
    shape = ModelShape.of(model)
    pad = tokenizer.pad_token_id
    model.to(s.device)

    # Our reference log-probs on the initial weights, as the ref_logps stage computes them, for
    # the pairs the run uses (the others keep build's random ones and are never drawn).
    used = sorted({i for b in batches for i in b})
    seqs = [examples[i].chosen for i in used] + [examples[i].rejected for i in used]
    with torch.no_grad():  # scoring builds no graph, whatever score_sequences is decorated with
        ours_ref, _ = score_sequences(model, seqs, pad, 2 * s.batch_size, s.device,
                                      mixed_precision=s.precision)
    n = len(used)
    for k, i in enumerate(used):
        examples[i] = replace(examples[i], ref_chosen=float(ours_ref[k]),
                              ref_rejected=float(ours_ref[n + k]))

    turns = TakeTurns(("ours", "trl"), s.window, s.device)

    class TRLTurn(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            turns.step_done("trl")

    tmp = tempfile.TemporaryDirectory()
    trainer, trl_used = trl_trainer(trl_model, tokenizer, examples, batches, s, tmp.name,
                                    [TRLTurn()])
    assert trl_used == used

    # (a) reference log-probs: TRL precomputed them in its constructor, on its copy.
    trl_ref = np.concatenate([np.asarray(trainer.train_dataset["ref_chosen_logps"]),
                              np.asarray(trainer.train_dataset["ref_rejected_logps"])])
    diff = np.abs(trl_ref - ours_ref)
    ref_check = {"sequences": len(diff), "precision": s.precision,
                 "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                 "max_rel": float((diff / np.abs(ours_ref)).max())}

    # (b) the first batch's DPO loss, fp32 (no autocast), shared reference log-probs.
    first = batches[0]
    noise = np.random.default_rng(1).normal(0.0, 5.0, size=(len(first), 2))
    ref_c = [examples[i].ref_chosen + noise[k, 0] for k, i in enumerate(first)]
    ref_r = [examples[i].ref_rejected + noise[k, 1] for k, i in enumerate(first)]
    items = [replace(examples[i], ref_chosen=rc, ref_rejected=rr)
             for i, rc, rr in zip(first, ref_c, ref_r, strict=True)]
    first_batch = preference_batch(items, pad, s.ours_layout(model))
    batch = {k: v.to(s.device) for k, v in first_batch.items()}
    features = [dict(trainer.train_dataset[used.index(i)], ref_chosen_logps=rc,
                     ref_rejected_logps=rr) for i, rc, rr in zip(first, ref_c, ref_r, strict=True)]
    model.train()
    with torch.no_grad():
        ours_loss, _ = PreferenceLoss(OBJECTIVES["dpo_helpful"], BETA, 0.0,
                                      s.ours_layout(model))(model, batch)
        trl_loss = trainer.compute_loss(
            trainer.model, trainer._prepare_inputs(trainer.data_collator(features)))
    trainer._metrics["train"].clear()  # that call logged metrics; the run starts clean
    trainer._total_train_tokens = 0
    loss_check = {"ours": float(ours_loss), "trl": float(trl_loss),
                  "abs_diff": abs(float(ours_loss) - float(trl_loss)),
                  "tolerance": LOSS_TOLERANCE, "batch_pairs": len(first)}

    # Non-pad tokens of every batch each framework collates: the same batches, or a bug.
    tokens: dict[str, list[int]] = {"ours": [], "trl": []}
    trl_collate = trainer.data_collator

    def trl_collate_counted(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = trl_collate(rows)
        tokens["trl"].append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = trl_collate_counted

    layout = s.ours_layout(model)

    def our_batch(items: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        tokens["ours"].append(sum(len(e.chosen.input_ids) + len(e.rejected.input_ids)
                                  for e in items))
        return preference_batch(items, pad, layout)

    # After TRL's: TrainingArguments resets accelerate's shared state when it sets up devices.
    accelerator = make_accelerator(cfg)
    loss_fn = PreferenceLoss(OBJECTIVES["safedpo"], beta=BETA, delta=10.0, layout=layout)
    peak_dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    load_before = load_average()
    peak_before = device_matmul_peak(s.device, peak_dtype)

    def ours() -> None:
        train_loop(model, examples, our_batch, loss_fn, cfg, accelerator,
                   Checkpointer(None, "bench", every=10**9),
                   lambda step, metrics: turns.step_done("ours"), stop_after=s.total)

    threads = [turns.run("ours", ours), turns.run("trl", trainer.train)]
    for t in threads:
        t.join()
    for name, exc in turns.errors.items():
        raise RuntimeError(f"{name} failed") from exc
    peak_after = device_matmul_peak(s.device, peak_dtype)
    tmp.cleanup()

    timed = range(s.warmup, s.total)
    flops = sum(shape.flops(step_lengths(examples, batches[k])) for k in timed)
    n_tokens = sum(int(step_lengths(examples, batches[k]).sum()) for k in timed)
    peak = max(peak_before["best"], peak_after["best"])
    frameworks = {}
    for name in ("ours", "trl"):
        sec = sum(turns.seconds[name][k] for k in timed)
        frameworks[name] = {
            "sec_per_step": sec / s.steps, "pairs_per_s": s.steps * s.batch_size / sec,
            "tokens_per_s": n_tokens / sec, "mfu": flops / sec / 1e9 / peak,
            "step_seconds": [round(x, 4) for x in turns.seconds[name]]}
    return {
        "setup": asdict(s), "params": shape.params, "pairs_used": len(used),
        "frameworks": frameworks, "same_batches": tokens["ours"] == tokens["trl"],
        "tokens_per_step": tokens["ours"], "matmul_peak_gflop_per_s": {
            "dtype": str(peak_dtype), "before": peak_before, "after": peak_after, "used": peak},
        "torch_threads": torch.get_num_threads(),
        "ours_logps_path": ours_logps_path(model),
        "ours_layout": layout.describe(),
        "trl_optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "load_average": [load_before[0], load_average()[0]],
        # Both loops share the process's CUDA allocator: retries (a cudaFree of the cache and a
        # new cudaMalloc) or many device allocations would explain rare slow steps.
        "cuda_allocator": {k: v for k, v in torch.cuda.memory_stats().items()
                           if k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                    "num_sync_all_streams", "num_ooms")}
        if s.device == "cuda" else None,
        "agreement": {"ref_logps": ref_check, "first_batch_loss": loss_check},
    }


# --- peak memory (one process per framework) ------------------------------------------------

@contextmanager
def peak_memory(device: str, base_mb: float) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield out
        out.update(peak_mb=torch.cuda.max_memory_allocated() / 2**20,
                   method="torch.cuda.max_memory_allocated (weights, grads, AdamW, activations)")
    else:
        with PeakRSS() as peak:
            yield out
        out.update(peak_mb=peak.peak_mb - base_mb,
                   method=f"peak RSS in training minus RSS before the model ({peak.method}, "
                          "glibc mmap threshold pinned at 1 MiB)")


def run_memory(s: Setup, framework: str) -> dict[str, Any]:
    import datasets  # noqa: F401  (both processes import the same, before the baseline)
    import trl  # noqa: F401

    if s.device == "cpu":
        pin_mmap_threshold(1 << 20)  # RSS follows live tensors; this process is not timed
    gc.collect()
    base = rss_mb()
    total = min(s.memory_steps, s.total)
    model, tokenizer, examples, cfg, batches = prepare(s, total)
    if framework == "ours":
        accelerator = make_accelerator(cfg)
        layout = s.ours_layout(model)
        loss_fn = PreferenceLoss(OBJECTIVES["safedpo"], beta=BETA, delta=10.0, layout=layout)
        pad = tokenizer.pad_token_id
        with peak_memory(s.device, base) as mem:
            train_loop(model, examples, lambda items: preference_batch(items, pad, layout),
                       loss_fn, cfg, accelerator, Checkpointer(None, "bench", every=10**9),
                       lambda step, metrics: None, stop_after=total)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            trainer, _ = trl_trainer(model, tokenizer, examples, batches, s, tmp, [])
            with peak_memory(s.device, base) as mem:
                trainer.train()
    return {**mem, "steps": total}


# --- driver ---------------------------------------------------------------------------------

def child(s: Setup, role: str) -> dict[str, Any]:
    """Run one role of one configuration in a fresh process and return its JSON."""
    env = {**os.environ, **CHILD_ENV}
    if s.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # ours picks the GPU whenever it sees one
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        # stderr is kept back (progress bars that cannot be turned off) unless the child fails.
        done = subprocess.run([sys.executable, __file__, "--role", role, "--setup",
                               json.dumps(asdict(s)), "--json", str(out)],
                              env=env, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-20000:])
            sys.exit(f"{role} of {s.config} failed (exit {done.returncode})")
        return {**json.loads(out.read_text()), "wall_s": round(time.perf_counter() - t0, 1)}


def report(results: dict[str, dict[str, Any]]) -> None:
    # GPU: peak allocated; CPU: peak RSS in training minus RSS before the model was built.
    mem_unit = "peak MB" if next(iter(results.values()))["setup"]["device"] == "cuda" \
        else "ΔRSS MB"
    print(f"{'config':<7} {'run':<9} {'params':>8} {'s/step':>8} {'pairs/s':>9} "
          f"{'tokens/s':>10} {'MFU':>7} {mem_unit:>9}")
    for name, r in results.items():
        f, m = r["frameworks"], r.get("memory", {})
        for fw, label in (("ours", "ours"), ("trl", "TRL")):
            x = f[fw]
            mem = f"{m[fw]['peak_mb']:>9.0f}" if fw in m else f"{'-':>9}"
            print(f"{name:<7} {label:<9} {r['params'] / 1e6:>7.1f}M {x['sec_per_step']:>8.4f} "
                  f"{x['pairs_per_s']:>9.1f} {x['tokens_per_s']:>10.0f} {x['mfu']:>7.2%} {mem}")
        o, t = f["ours"], f["trl"]
        mem = (f"{m['ours']['peak_mb'] / m['trl']['peak_mb']:>8.2f}x" if "ours" in m
               else f"{'-':>9}")
        print(f"{name:<7} {'ours/TRL':<9} {'':>8} {o['sec_per_step'] / t['sec_per_step']:>7.2f}x "
              f"{o['pairs_per_s'] / t['pairs_per_s']:>8.2f}x "
              f"{o['tokens_per_s'] / t['tokens_per_s']:>9.2f}x {o['mfu'] / t['mfu']:>6.2f}x {mem}")
    for name, r in results.items():
        s, a = r["setup"], r["agreement"]
        ref, loss = a["ref_logps"], a["first_batch_loss"]
        ok = "OK" if loss["abs_diff"] <= loss["tolerance"] else "FAILED"
        prec = "fp32" if ref["precision"] == "no" else ref["precision"]
        print(f"{name}: before any update: (a) reference log-probs of {ref['sequences']} "
              f"sequences ({prec}): max |Δ| {ref['max_abs']:.2e} nats (mean {ref['mean_abs']:.1e}, "
              f"max relative {ref['max_rel']:.1e}); (b) first-batch DPO loss ({loss['batch_pairs']}"
              f" pairs, fp32): ours {loss['ours']:.7f}, TRL {loss['trl']:.7f}, |Δ| "
              f"{loss['abs_diff']:.1e} (target ≤ {loss['tolerance']:.0e}) {ok}")
        peak = r["matmul_peak_gflop_per_s"]
        mem = next(iter(r.get("memory", {}).values()), {}).get("method", "not measured")
        print(f"{name}: {s['data']} data, {s['device']}, {prec}, batch {s['batch_size']} pairs, "
              f"max_length {s['max_length']}, {s['warmup']} warm-up + {s['steps']} timed steps "
              f"each, turns of {s['window']} step(s), {r['torch_threads']} threads, same batches: "
              f"{r['same_batches']}, matmul peak {peak['used']:.0f} GFLOP/s ({peak['dtype']}), "
              f"TRL optimizer {r['trl_optimizer']}, TRL gradient checkpointing "
              f"{s['trl_gradient_checkpointing']}, ours: log-probs from "
              f"{r.get('ours_logps_path', '?')}, {r.get('ours_layout', '?')}, load avg "
              f"{r['load_average'][0]} -> {r['load_average'][1]}, wall s: pair {r['wall_s']}, "
              f"memory "
              f"{[m['wall_s'] for m in r.get('memory', {}).values()]}; memory: {mem}")
        if r.get("cuda_allocator"):
            print(f"{name}: CUDA allocator over the timed pair: {r['cuda_allocator']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[*CONFIGS, *PRETRAINED, *SETS], default=None,
                    help="a model size, or a set: cpu = tiny + 30m, gpu = 110m + 340m "
                         "(default: the set for the device)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on a GPU, fp32 on CPU (as train.mixed_precision)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="pairs per step (default 64 on a GPU; on CPU 32 tiny, 16 otherwise)")
    ap.add_argument("--data", choices=DATA, default="toy",
                    help="toy pairs, or long PKU-SafeRLHF-shaped pairs with a chat template")
    ap.add_argument("--max-length", type=int, default=None,
                    help="default: 192 (toy, params.yaml) or 512 (pku)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first, each")
    ap.add_argument("--steps", type=int, default=None, help="timed steps each (default per "
                    f"config: {DEFAULT_STEPS})")
    ap.add_argument("--window", type=int, default=1, help="steps per turn")
    ap.add_argument("--pairs", type=int, default=1000, help="rows generated")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--lr", type=float, default=TrainConfig().lr)
    ap.add_argument("--max-grad-norm", type=float, default=TrainConfig().max_grad_norm)
    ap.add_argument("--memory-steps", type=int, default=3,
                    help="steps run by each framework's peak-memory process")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL with its default gradient checkpointing (ours has none)")
    ap.add_argument("--forward-groups", type=int, default=None,
                    help="ours: length groups per padded forward pass (default: "
                         "logps.forward_layout, 4 on CPU, 1 on a GPU)")
    ap.add_argument("--layout", choices=["default", *get_args(LayoutKind)], default="default",
                    help="ours: forward layout (default: logps.forward_layout's choice for the "
                         "device, as train.layout: null)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--role", choices=["pair", "memory-ours", "memory-trl"], default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if importlib.util.find_spec("trl") is None:
        sys.exit(NEED_TRL)

    if args.role is not None:  # a child process
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        s = Setup(**json.loads(args.setup))
        out = run_pair(s) if args.role == "pair" else run_memory(s, args.role.split("-")[1])
        args.json.write_text(json.dumps(out, indent=2))
        return

    if args.warmup < 1:
        ap.error("--warmup must be >= 1: the first step allocates the optimizer state")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU")
    precision = {"auto": "bf16" if device == "cuda" else "no", "fp32": "no",
                 "bf16": "bf16"}[args.precision]
    config = args.config or ("gpu" if device == "cuda" else "cpu")
    results: dict[str, dict[str, Any]] = {}
    for name in SETS.get(config, [config]):
        batch = args.batch_size or (64 if device == "cuda" else 32 if name == "tiny" else 16)
        s = Setup(config=name, data=args.data, device=device, precision=precision,
                  batch_size=batch, warmup=args.warmup,
                  max_length=args.max_length or DEFAULT_MAX_LENGTH[args.data],
                  steps=args.steps or DEFAULT_STEPS[name], window=args.window,
                  pairs=args.pairs, threads=args.threads, lr=args.lr,
                  max_grad_norm=args.max_grad_norm, memory_steps=args.memory_steps,
                  trl_gradient_checkpointing=args.trl_gradient_checkpointing,
                  forward_groups=args.forward_groups,
                  layout=None if args.layout == "default" else args.layout)
        results[name] = child(s, "pair")
        if not args.no_memory:
            results[name]["memory"] = {fw: child(s, f"memory-{fw}") for fw in ("ours", "trl")}
    report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
