"""The training loop shared by SFT and preference training, read top to bottom: the plan
(`Plan`), the loop (`train_loop`), resumable checkpoints (`Checkpointer`, `run_key`).

One loop; each recipe brings its batch loss (`sft.SFTLoss`, `preference.PreferenceLoss`), so
this module knows nothing of objectives or reference log-probs and an edit to those never
reruns the `sft` stage. Batches are a pure function of
(seed, step): epoch `e` uses a permutation drawn from a generator seeded with `seed + e`, and the
global batch of a step is split into `grad_accum × num_processes` equal micro-batches. That is
what makes a resumed run bit-identical to an uninterrupted one, and a 2-process run follow the
1-process loss trajectory: no hidden data-loader state to save.

`batch_size` is the global batch: examples per optimizer step, across processes and
accumulation steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler

from pipeline.config import OptimConfig
from pipeline.errors import UserError
from pipeline.precision import device, resolve_mixed_precision
from pipeline.sharding import (
    ShardedState,
    clip_grad_norm,
    full_state_dict,
    is_sharded,
    reshard,
)

T = TypeVar("T")
Metrics = dict[str, torch.Tensor]
LossFn = Callable[[PreTrainedModel, dict[str, torch.Tensor]], tuple[torch.Tensor, Metrics]]

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
STATE_FILE = "trainer_state.json"


class NonFiniteLossError(UserError):
    """Raised when a step's loss is NaN or inf; training stops instead of corrupting weights."""


def make_accelerator(cfg: OptimConfig) -> Accelerator:
    """bf16 on GPU when `mixed_precision: auto`; fp32 on CPU. An explicit `bf16` on a CPU with
    native bf16 (AVX512-BF16, AMX) speeds up a ~30M-parameter step (docs/benchmarks.md) but
    not the tiny one, and changes the numbers, so it is opt-in."""
    on = device()
    # `cpu=True` is what makes accelerate set up gloo when torchrun starts several CPU processes.
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision, on),
                       cpu=on.type == "cpu")


@dataclass
class Plan:
    """How many steps, and how each global batch splits into micro-batches."""

    n_examples: int
    batch_size: int
    grad_accum: int
    num_processes: int
    epochs: float
    steps_per_epoch: int = field(init=False)
    total_steps: int = field(init=False)
    micro_batch: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_examples == 0:
            raise UserError("no training examples (did selection drop every pair?)")
        shards = self.grad_accum * self.num_processes
        if self.batch_size % shards:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by grad_accum × processes "
                f"= {self.grad_accum} × {self.num_processes}")
        self.micro_batch = self.batch_size // shards
        # Drop the last partial batch: equal micro-batches keep the mean loss exact under DDP.
        self.steps_per_epoch = max(1, self.n_examples // self.batch_size)
        self.total_steps = max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def micro_batches(self, step: int, seed: int, rank: int) -> list[list[int]]:
        """Example indices of each of this process's micro-batches at `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(self.n_examples, generator=gen)
        batch = perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        if len(batch) < self.batch_size:  # fewer examples than one batch: wrap around
            batch = perm[torch.arange(self.batch_size) % self.n_examples]
        chunks = batch.view(self.grad_accum, self.num_processes, self.micro_batch)
        return [chunks[m, rank].tolist() for m in range(self.grad_accum)]


@dataclass
class LoopResult:
    steps: int
    seconds: float
    resumed_from: int
    last_metrics: dict[str, float]
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def run_key(*parts: Any) -> str:
    """What a checkpoint is tagged with: a resumed run must have been started with the same
    `parts` (configuration, data size, fingerprint)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpointer:
    """Resumable state (model, optimizer, scheduler, RNG, step) in one folder, swapped in
    atomically, tagged with a run key so a changed configuration never resumes an old run."""

    def __init__(self, root: Path | None, run_key: str, every: int,
                 notes: Callable[[], dict[str, Any]] | None = None) -> None:
        self.root = root
        self.run_key = run_key
        self.every = every
        # What the caller needs to rebuild its own files on resume (the log so far), saved in
        # the same atomic swap as the weights, so the two always describe the same step.
        self.notes = notes

    @property
    def latest(self) -> Path | None:
        return None if self.root is None else self.root / "latest"

    def _state(self) -> dict[str, Any]:
        if self.latest is None or self.root is None:
            return {}
        old = self.root / ".old"
        if not self.latest.exists() and (old / STATE_FILE).exists():
            # Killed between the two renames of `save`: the previous checkpoint is complete.
            with contextlib.suppress(OSError):  # another process may have got there first
                old.rename(self.latest)
        if not (self.latest / STATE_FILE).exists():
            return {}
        state = json.loads((self.latest / STATE_FILE).read_text())
        return state if state.get("run_key") == self.run_key else {}

    def resumable_step(self) -> int:
        return int(self._state().get("step", 0))

    def resumed_notes(self) -> dict[str, Any]:
        """The `notes` saved with the checkpoint `resumable_step` resumes from ({} if none)."""
        return dict(self._state().get("notes") or {})

    def save(self, accelerator: Accelerator, step: int,
             write: Callable[[Path], None] | None = None) -> None:
        """`write(folder)` writes the resumable state, every process taking part (default:
        `accelerator.save_state`; a sharded run's `ShardedState.save`)."""
        assert self.root is not None and self.latest is not None
        tmp = self.root / f".step-{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        if write is None:
            accelerator.save_state(str(tmp), safe_serialization=True)
        else:
            write(tmp)
        # Every process has written its part (RNG state, shards) before the folder moves.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            notes = self.notes() if self.notes is not None else {}
            # Written last: a folder without it is a checkpoint whose save was cut short.
            (tmp / STATE_FILE).write_text(json.dumps(
                {"step": step, "run_key": self.run_key, "notes": notes}))
            old = self.root / ".old"
            if old.exists():  # left by a process killed in the middle of the last swap
                shutil.rmtree(old)
            if self.latest.exists():
                self.latest.rename(old)
            tmp.rename(self.latest)
            if old.exists():
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def clear(self, accelerator: Accelerator) -> None:
        if accelerator.is_main_process and self.root is not None and self.root.exists():
            shutil.rmtree(self.root)


def train_loop(
    model: PreTrainedModel,
    examples: Sequence[T],
    make_batch: Callable[[list[T]], dict[str, torch.Tensor]],
    loss_fn: LossFn,
    cfg: OptimConfig,
    accelerator: Accelerator,
    checkpointer: Checkpointer,
    log: Callable[[int, dict[str, float]], None],
    stop_after: int | None = None,
) -> tuple[PreTrainedModel, LoopResult]:
    """Optimise `loss_fn` over `examples`; returns the unwrapped model and a summary.

    `log(step, metrics)` is called on the main process after every optimizer step with the
    metrics averaged over the global batch. `stop_after` ends the run early after that many
    steps (used by tests to simulate a kill after a checkpoint).
    """
    plan = Plan(len(examples), cfg.batch_size, cfg.grad_accum, accelerator.num_processes,
                cfg.epochs)
    # A model sharded by `pipeline.sharding` (FSDP2) is not `prepare`d (accelerate would wrap
    # it in DDP): it clips, checkpoints and gathers its weights through that module.
    sharded = is_sharded(model)
    if sharded:
        reshard(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    # On one device or under DDP, the fused AdamW: one kernel for all parameters and no
    # parameter-sized temporaries at its peak (the foreach default holds some), and faster on
    # CPU (docs/benchmarks.md). FSDP and DeepSpeed shard or own the parameters, so they keep
    # the default.
    fused = not sharded and accelerator.distributed_type in {
        "cuda": (DistributedType.NO, DistributedType.MULTI_GPU),
        "cpu": (DistributedType.NO, DistributedType.MULTI_CPU),
    }.get(accelerator.device.type, ())
    if fused:
        model.to(accelerator.device)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused or None)
    scheduler = get_scheduler(
        _SCHEDULES[cfg.schedule], optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * plan.total_steps),
        num_training_steps=plan.total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and plan.grad_accum > 1:
        # DeepSpeed steps its optimizer inside every backward unless it owns accumulation.
        raise UserError("with DeepSpeed set gradient_accumulation_steps in the DeepSpeed config "
                        "and keep grad_accum: 1 in params.yaml")
    # The scheduler is not `prepare`d: accelerate would step it once per process per step.
    write: Callable[[Path], None] | None = None
    if sharded:
        state = ShardedState(model, optimizer, scheduler)
        write, read = state.save, state.load
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        read = accelerator.load_state

    start = checkpointer.resumable_step()
    if start:
        read(checkpointer.latest)
    t0 = time.perf_counter()
    model.train()
    last: dict[str, float] = {}
    done = start
    bar = tqdm(range(start, plan.total_steps), initial=start, total=plan.total_steps,
               desc="train", unit="step", disable=not accelerator.is_local_main_process)
    pin = accelerator.device.type == "cuda"
    for step in bar:
        sums: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), device=accelerator.device)
        micro = plan.micro_batches(step, cfg.seed, accelerator.process_index)
        for m, idx in enumerate(micro):
            # Pinned host memory makes the copy truly asynchronous on a GPU: the host collates
            # and queues the next forward while the previous optimizer step still runs.
            batch = {k: (v.pin_memory() if pin else v).to(accelerator.device, non_blocking=True)
                     for k, v in make_batch([examples[i] for i in idx]).items()}
            sync = m == len(micro) - 1
            # (An FSDP2 model reduce-scatters every micro-batch: skipping it would hold whole
            # unsharded gradients, the memory sharding is there to save.)
            ctx = accelerator.no_sync(model) if not (sync or sharded) else nullcontext()
            with ctx, accelerator.autocast():
                loss, metrics = loss_fn(model, batch)
                accelerator.backward(loss / plan.grad_accum)
            bad = bad + (~torch.isfinite(loss.detach())).float()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / plan.grad_accum
        norm = clip_grad_norm(model, cfg.max_grad_norm) if sharded \
            else accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if norm is not None:  # (DeepSpeed clips inside its own step)
            sums["grad_norm"] = torch.as_tensor(norm, device=accelerator.device).float()
            bad = bad + (~torch.isfinite(sums["grad_norm"])).float()
        # One host synchronisation per step: the metrics and the finiteness flags travel in one
        # tensor, reduced over processes, read before the optimizer may apply a NaN.
        keys = sorted(sums)
        reduced = accelerator.reduce(torch.stack([*(sums[k] for k in keys), bad]),
                                     reduction="mean").tolist()
        last = dict(zip(keys, reduced[:-1], strict=True))
        if reduced[-1] > 0:
            what = "loss" if not math.isfinite(last["loss"]) else "grad_norm"
            raise NonFiniteLossError(
                f"{what} is {last[what]} at step {step} (on at least one process); lower the "
                "learning rate or check the data and reference log-probs")
        lr = scheduler.get_last_lr()[0]  # the rate this step used, before the scheduler moves
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last["lr"] = lr
        if accelerator.is_main_process:
            log(step + 1, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}")
        done = step + 1
        if checkpointer.root is not None and done % checkpointer.every == 0 \
                and done < plan.total_steps:
            checkpointer.save(accelerator, done, write)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    # Every process takes part: under FSDP / ZeRO-3 this gathers the shards into a full state
    # dict on the main process, which is what `save_pretrained` must write.
    state_dict = full_state_dict(model) if sharded else accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model), LoopResult(
        steps=done, seconds=seconds, resumed_from=start, last_metrics=last,
        state_dict=state_dict)
