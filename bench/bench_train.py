"""Time the preference-training step of the `train` stage on the tiny model and a ~30M model.

What is timed is what `run_preference` runs: `train_loop` with `preference_batch`,
`PreferenceLoss` (SafeDPO) and `make_accelerator`, on `builtin:toy` pairs (`--data pku`: long
PKU-SafeRLHF-shaped pairs with a chat template, see `DATA`) normalized and selected for
`safedpo`, tokenized by a tokenizer trained on them. Reference log-probs are
random (the loss value does not change the step's cost), and nothing is checkpointed.

Figures per configuration: pairs/s, tokens/s (non-pad), share of padding tokens, model FLOP/s
and its fraction of this machine's measured matmul peak (MFU), and peak RSS with the
memory accounting that shows only one model is held.

FLOPs of a step (fwd + bwd; attention counted in full, not halved for the causal mask):
    sum over the 2B sequences of   6 · N_mm · t  +  12 · L · d · t²
with N_mm the weights of every Linear (attention, MLP and the tied LM head; not norms, not the
embedding lookup), L layers, d hidden size, t the sequence's tokens. MFU counts non-pad tokens
only (useful work); HFU counts the padded width the kernels actually run. The peak is the best
`torch.matmul` GFLOP/s on 1024² and 2048² matrices (fp32, or bf16 under `--mixed-precision
bf16`), with the same thread count, measured just before and just after the timed steps (the
higher is used).

    python bench/bench_train.py                          # both configs, as `train` runs
    python bench/bench_train.py --threads 1              # on a machine shared with other jobs
    python bench/bench_train.py --chunks 1               # one padded forward (no length groups)
    python bench/bench_train.py --layout padded          # padded, in length groups
    python bench/bench_train.py --data pku               # long PKU-shaped pairs, max_length 512
    python bench/bench_train.py --config 30m --compile   # torch.compile the model
    python bench/bench_train.py --config 30m --memory-exact --steps 1 [--reference-model]

`--memory-exact` makes peak RSS follow live tensors (see `pin_mmap_threshold`); with
`--reference-model` a frozen second model is held and run each step, as DPO usually is: the
difference between the two peaks is what `train` saves by reading reference log-probs from disk.
Each configuration of `--config both` runs in a fresh subprocess, so each peak is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import pipeline.training as training
from pipeline.config import LayoutKind, TinyModelConfig, ToyConfig, TrainConfig
from pipeline.encoding import Encoder, Template, resolve_template, template_corpus
from pipeline.gguf import GEMMA_270M, converted
from pipeline.layouts import layout_of, length_groups
from pipeline.logps import ForwardLayout, forward_layout
from pipeline.modeling import build_tiny_model, load_pretrained, train_tiny_tokenizer
from pipeline.normalize import normalize_splits
from pipeline.objectives import OBJECTIVES, select_pairs
from pipeline.preference import (
    PreferenceExample,
    PreferenceLoss,
    preference_batch,
    preference_examples,
)
from pipeline.toydata import generate
from pipeline.training import (
    Checkpointer,
    make_accelerator,
    train_loop,
)

CONFIGS: dict[str, TinyModelConfig] = {
    # params.yaml `model.tiny`, i.e. the defaults.
    "tiny": TinyModelConfig(),
    # ~30M parameters; V/d = 16 as in the tiny model.
    "30m": TinyModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                           num_layers=8, num_heads=8, num_kv_heads=8),
}
# Per-config defaults: `--config both --threads 1` takes about two minutes on 2 busy cores.
DEFAULT_STEPS = {"tiny": 20, "30m": 3}
DEFAULT_WARMUP = {"tiny": 3, "30m": 1}
BETA, DELTA = 0.1, 10.0  # params.yaml; they do not change the step's cost


# --- machine ---------------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (1024, 2048),
                windows: int = 3, seconds: float = 0.4) -> dict[str, float]:
    """Best GFLOP/s of `torch.matmul` on square `dtype` matrices, per size and overall.

    Best of several short windows: other jobs on the machine only ever slow a window down, so
    the best one is the closest to what the cores can do right now.
    """
    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        torch.matmul(a, b, out=c)  # first call pays for MKL's set-up
        flop = 2.0 * n ** 3
        best = 0.0
        for _ in range(windows):
            reps, t0 = 0, time.perf_counter()
            while (dt := time.perf_counter() - t0) < seconds:
                torch.matmul(a, b, out=c)
                reps += 1
            best = max(best, reps * flop / dt)
        out[str(n)] = best / 1e9
    out["best"] = max(out.values())
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- memory ----------------------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def pin_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve every allocation over `nbytes` with its own mmap, returned on free.

    By default glibc raises that threshold as blocks are freed (up to 32 MB) and keeps freed
    heap memory, so the peak RSS of a loop depends on allocation history by hundreds of MB.
    Pinned, RSS follows the bytes of live tensors; each large allocation then pays page faults,
    so timings are taken without it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, nbytes))


class PeakRSS:
    """Peak resident memory over a block.

    Linux: writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so
    the peak is exact and belongs to the block alone. Elsewhere a thread samples RSS every 2 ms
    (psutil), which can miss short spikes.
    """

    def __init__(self) -> None:
        self.method = ""
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs reset"
        except OSError:
            self.method = "psutil RSS sampled every 2 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_mb = (_status_kb("VmHWM") or 0) / 1024


def live_models() -> tuple[int, int]:
    """(top-level PreTrainedModel objects alive, bytes of distinct parameter storages alive).

    `LlamaForCausalLM.model` is itself a PreTrainedModel, so submodules are not counted.
    """
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object trips deprecated aliases
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        models = [o for o in objects if isinstance(o, PreTrainedModel)]
        params = [o for o in objects if isinstance(o, torch.nn.Parameter)]
    inner = {id(m) for o in models for m in o.modules() if m is not o}
    storages: dict[int, int] = {}
    for p in params:
        with contextlib.suppress(RuntimeError):  # torch.compile's fake tensors own no memory
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(1 for o in models if id(o) not in inner), sum(storages.values())


def saved_activation_bytes(model: PreTrainedModel, loss_fn: training.LossFn,
                           batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward on `batch` (distinct storages, weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(model, batch)
    del loss
    return sum(seen.values())


# --- data and model --------------------------------------------------------------------------

# Inputs: `toy`, the built-in toy pairs with the plain template (the default run), or `pku`,
# long PKU-SafeRLHF-v1-shaped rows (prompts of 20-120 words, responses of 150-400) with a
# SentencePiece-style tokenizer and a Llama-2-style chat template, as the users'-path tests
# build them (tests/real_models.py). `pku` is the shape a real run has: prompts a small share of
# each sequence, long responses, and pairs cut at `max_length` (512 as in safe-rlhf).
DATA = ("toy", "pku")
DEFAULT_MAX_LENGTH = {"toy": TrainConfig().max_length, "pku": 512}


def _real_models() -> ModuleType:
    """tests/real_models.py, loaded by path: the tests and the benchmarks share one definition of
    the users' data shape."""
    path = Path(__file__).resolve().parents[1] / "tests" / "real_models.py"
    spec = importlib.util.spec_from_file_location("real_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_pairs(data: str, n_train: int) -> pd.DataFrame:
    """Raw rows of `data` -> normalized pairs (the `data` + `normalize` stages, in memory)."""
    if data == "toy":
        raw_train, raw_test = generate(ToyConfig(n_train=n_train, n_test=50))
    else:
        rows = pd.DataFrame(_real_models().pku_v1_rows(n_train + 50, seed=0))
        raw_train, raw_test = rows.iloc[:n_train], rows.iloc[n_train:]
    train, _, _ = normalize_splits(raw_train, raw_test)
    return train


#: Real pretrained models by bench config name (the converted GGUF of the `gemma` extra).
PRETRAINED = {"gemma3-270m": GEMMA_270M}


def build(name: str, data: str, pairs: pd.DataFrame, max_length: int, seed: int
          ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[PreferenceExample]]:
    if name in PRETRAINED:
        # The model, tokenizer and turn format the pipeline trains (`model.template: auto`).
        model, tokenizer = load_pretrained(converted(PRETRAINED[name]))
        return model, tokenizer, _examples(pairs, tokenizer, resolve_template("auto", tokenizer),
                                           max_length, seed)
    cfg = CONFIGS[name]
    cfg = replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, max_length))
    # As `run_sft` does: the tokenizer learns from the texts it will see.
    if data == "toy":
        template = resolve_template("plain", None)
        prompts = pairs["prompt"].tolist() * 2
        responses = pairs["response_0"].tolist() + pairs["response_1"].tolist()
        tokenizer = train_tiny_tokenizer(template_corpus(template, prompts, responses),
                                         cfg.vocab_size)
    else:
        texts = pairs[["prompt", "response_0", "response_1"]].to_numpy().ravel().tolist()
        tokenizer = _real_models().metaspace_tokenizer(texts, vocab_size=cfg.vocab_size)
        tokenizer.pad_token = tokenizer.eos_token  # as `modeling` does for a pad-less checkpoint
        template = resolve_template("chat", tokenizer)
    examples = _examples(pairs, tokenizer, template, max_length, seed)
    model = build_tiny_model(cfg, tokenizer)
    if model.config.vocab_size < cfg.vocab_size:
        # Toy text saturates BPE at ~2.8k tokens; real data would fill the vocabulary, and the
        # LM head's cost grows with it, so the model gets the full-size (tied) embedding.
        model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
    return model, tokenizer, examples


def _examples(pairs: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, template: Template,
              max_length: int, seed: int) -> list[PreferenceExample]:
    """As `preference_examples` does, with random reference log-probs (cost does not depend on
    them; a scale like real summed log-probs keeps the loss finite)."""
    selected, _ = select_pairs(pairs, "safedpo")
    rng = np.random.default_rng(seed)
    ref = -rng.uniform(50, 300, size=(len(selected), 2))
    return preference_examples(selected.assign(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1]),
                               Encoder(tokenizer, template, max_length))


@dataclass
class ModelShape:
    params: int
    embedding: int
    matmul: int  # weights of every Linear, the tied LM head included
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelShape:
        linear = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, torch.nn.Linear))
        return cls(params=sum(p.numel() for p in model.parameters()),
                   embedding=model.get_input_embeddings().weight.numel(), matmul=linear,
                   layers=model.config.num_hidden_layers, hidden=model.config.hidden_size)

    def flops(self, lengths: np.ndarray) -> float:
        """Model FLOPs of fwd + bwd over sequences of these lengths (formula in the docstring)."""
        t = lengths.astype(np.float64)
        return float((6.0 * self.matmul * t + 12.0 * self.layers * self.hidden * t * t).sum())


# --- the experiment knobs --------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceHeldLoss:
    """Counterfactual: DPO as usually written, with a frozen reference model in memory whose
    log-probs are computed every step. Used only to show what holding one would cost."""

    inner: PreferenceLoss
    reference: PreTrainedModel

    def __call__(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, training.Metrics]:
        with torch.no_grad():
            lp, _ = self.inner.layout.logps(self.reference, batch)
        n = batch["ref_chosen"].shape[0]
        return self.inner(model, {**batch, "ref_chosen": lp[:n], "ref_rejected": lp[n:]})


def executed_rows(batch: dict[str, torch.Tensor], lengths: np.ndarray, layout: ForwardLayout
                  ) -> list[np.ndarray]:
    """Per forward pass of a micro-batch: its rows, each at the width the kernels run (a packed
    row holds several sequences; attention is counted over the whole row)."""
    rows, width = batch["input_ids"].shape
    if layout_of(batch) != "padded" or layout.groups <= 1:
        return [np.full(rows, width)]
    parts = length_groups(lengths, layout.groups)
    return [np.full(len(p), p.max()) for p in parts]


# --- one configuration -----------------------------------------------------------------------

@dataclass
class Options:
    config: str
    data: str
    steps: int
    warmup: int
    batch_size: int
    max_length: int
    pairs: int
    threads: int
    attn: str | None
    chunks: int | None
    layout: str | None
    reference_model: bool
    compile: bool
    memory_exact: bool
    mixed_precision: str


@dataclass
class Result:
    options: dict[str, Any]
    load_average_before: list[float]
    load_average_after: list[float]
    torch_threads: int
    attn_implementation: str
    layout: str
    params: int
    params_embedding: int
    params_matmul: int
    pairs_available: int
    steps_timed: int
    seconds: float
    sec_per_step: float
    pairs_per_s: float
    tokens_per_s: float
    padded_tokens_per_s: float
    padding_share: float
    padding_share_executed: float
    model_tflop_per_step: float
    model_gflop_per_s: float
    executed_gflop_per_s: float
    matmul_peak_gflop_per_s: dict[str, Any]
    mfu: float
    hfu: float
    step_seconds: list[float]
    mfu_best_step: float
    memory: dict[str, Any] = field(default_factory=dict)


def run_one(opt: Options) -> Result:
    torch.set_num_threads(opt.threads)
    torch.manual_seed(0)
    pinned = opt.memory_exact and pin_mmap_threshold(1 << 20)
    load_before = load_average()
    pairs = bench_pairs(opt.data, opt.pairs)
    gc.collect()
    rss_base = rss_mb()
    model, tokenizer, examples = build(opt.config, opt.data, pairs, opt.max_length, seed=0)
    if opt.attn:
        model.set_attn_implementation(opt.attn)
    shape = ModelShape.of(model)
    rss_model = rss_mb()

    total = opt.warmup + opt.steps
    spe = max(1, len(examples) // opt.batch_size)
    cfg = replace(TrainConfig(), batch_size=opt.batch_size, max_length=opt.max_length,
                  epochs=float(math.ceil(total / spe)), warmup_ratio=0.0, schedule="constant",
                  mixed_precision=opt.mixed_precision)
    accelerator = make_accelerator(cfg)
    # The peak of the dtype the matmuls run in: bf16 autocast runs them in bf16.
    peak_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    layout = forward_layout(opt.layout, opt.chunks, model, accelerator.device)
    loss_fn: training.LossFn = PreferenceLoss(OBJECTIVES["safedpo"], beta=BETA, delta=DELTA,
                                              layout=layout)
    reference = None
    if opt.reference_model:
        reference = build(opt.config, opt.data, pairs, opt.max_length, seed=0)[0].eval()
        reference.requires_grad_(False)
        loss_fn = ReferenceHeldLoss(loss_fn, reference)
    if opt.compile:
        model = torch.compile(model, dynamic=True)

    pad_id = tokenizer.pad_token_id
    # (sequence lengths, rows each forward pass ran) of the micro-batches of this step
    pending: list[tuple[np.ndarray, list[np.ndarray]]] = []
    per_step: dict[int, list[tuple[np.ndarray, list[np.ndarray]]]] = {}
    times: dict[int, float] = {}
    census: dict[str, int] = {}
    widest: dict[str, torch.Tensor] = {}

    def make_batch(items: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        batch = preference_batch(items, pad_id, layout)
        lengths = np.array([len(e.chosen.input_ids) for e in items]
                           + [len(e.rejected.input_ids) for e in items])
        pending.append((lengths, executed_rows(batch, lengths, layout)))
        if not widest or batch["input_ids"].shape[1] > widest["input_ids"].shape[1]:
            widest.clear()
            widest.update(batch)
        return batch

    def log(step: int, metrics: dict[str, float]) -> None:
        if step == opt.warmup:
            # End of warm-up: weights and AdamW state are allocated; outside the timed window.
            census["models"], census["param_bytes"] = live_models()
        times[step] = time.perf_counter()
        per_step[step] = list(pending)
        pending.clear()

    peak_before = matmul_peak(peak_dtype)
    with PeakRSS() as peak:
        model, _ = train_loop(model, examples, make_batch, loss_fn, cfg, accelerator,
                              Checkpointer(None, "bench", every=10**9), log, stop_after=total)
    peak_after = matmul_peak(peak_dtype)
    load_after = load_average()

    timed = range(opt.warmup + 1, total + 1)
    seconds = times[total] - times[opt.warmup]
    micro = [m for s in timed for m in per_step[s]]
    lengths = np.concatenate([lens for lens, _ in micro])
    padded = sum(len(lens) * int(lens.max()) for lens, _ in micro)  # one padded forward
    groups = [g for _, rows in micro for g in rows]
    executed = sum(len(g) * int(g[0]) for g in groups)
    model_flops = shape.flops(lengths)
    executed_flops = sum(shape.flops(g) for g in groups)
    # Per step, for the best step's MFU: other jobs on the machine only ever slow a step down.
    step_s = [times[s] - times[s - 1] for s in timed]
    step_flops = [shape.flops(np.concatenate([lens for lens, _ in per_step[s]]))
                  for s in timed]
    peak_gflops = max(peak_before["best"], peak_after["best"])

    n = shape.params
    activations = saved_activation_bytes(model, loss_fn, dict(widest))
    mib = 2**20
    memory = {
        "method": peak.method + (", glibc mmap threshold pinned at 1 MiB" if pinned else ""),
        "rss_before_model_mb": round(rss_base, 1),
        "rss_after_model_mb": round(rss_model, 1),
        "peak_rss_train_mb": round(peak.peak_mb, 1),
        "peak_minus_before_model_mb": round(peak.peak_mb - rss_base, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "weights_mb": round(4 * n / mib, 1),
        "grads_mb": round(4 * n / mib, 1),
        "adamw_state_mb": round(8 * n / mib, 1),
        "saved_activations_widest_batch_mb": round(activations / mib, 1),
        "widest_batch_shape": list(widest["input_ids"].shape),
        "one_model_estimate_mb": round((16 * n + activations) / mib, 1),
        "second_weight_copy_mb": round(4 * n / mib, 1),
        "live_models_mid_run": census.get("models"),
        "live_param_mb_mid_run": round(census.get("param_bytes", 0) / mib, 1),
    }
    steps = len(timed)
    return Result(
        options=asdict(opt), load_average_before=load_before, load_average_after=load_after,
        torch_threads=torch.get_num_threads(),
        attn_implementation=str(getattr(model.config, "_attn_implementation", "?")),
        layout=layout.describe(),
        params=n, params_embedding=shape.embedding, params_matmul=shape.matmul,
        pairs_available=len(examples), steps_timed=steps, seconds=round(seconds, 3),
        sec_per_step=round(seconds / steps, 4),
        pairs_per_s=round(steps * opt.batch_size / seconds, 2),
        tokens_per_s=round(float(lengths.sum()) / seconds, 1),
        padded_tokens_per_s=round(padded / seconds, 1),
        padding_share=round(1 - float(lengths.sum()) / padded, 4),
        padding_share_executed=round(1 - float(lengths.sum()) / executed, 4),
        model_tflop_per_step=round(model_flops / steps / 1e12, 4),
        model_gflop_per_s=round(model_flops / seconds / 1e9, 2),
        executed_gflop_per_s=round(executed_flops / seconds / 1e9, 2),
        matmul_peak_gflop_per_s={"dtype": str(peak_dtype), "before": peak_before,
                                 "after": peak_after, "used": round(peak_gflops, 2)},
        mfu=round(model_flops / seconds / 1e9 / peak_gflops, 4),
        hfu=round(executed_flops / seconds / 1e9 / peak_gflops, 4),
        step_seconds=[round(x, 3) for x in step_s],
        mfu_best_step=round(max(f / t for f, t in zip(step_flops, step_s, strict=True))
                            / 1e9 / peak_gflops, 4),
        memory=memory,
    )


# --- driver ----------------------------------------------------------------------------------

def _row(name: str, r: dict[str, Any]) -> str:
    m = r["memory"]
    return (f"{name:<22} {r['params'] / 1e6:>6.2f}M {r['sec_per_step']:>7.3f} "
            f"{r['pairs_per_s']:>8.1f} {r['tokens_per_s']:>9.0f} {r['padding_share']:>6.1%} "
            f"{r['model_gflop_per_s']:>7.1f} {r['matmul_peak_gflop_per_s']['used']:>7.1f} "
            f"{r['mfu']:>6.1%} {r['mfu_best_step']:>6.1%} {r['hfu']:>6.1%} "
            f"{m['peak_rss_train_mb']:>8.0f} "
            f"{m['peak_minus_before_model_mb']:>8.0f} {m['one_model_estimate_mb']:>8.0f} "
            f"{m['second_weight_copy_mb']:>7.0f}")


HEADER = (f"{'run':<22} {'params':>7} {'s/step':>7} {'pairs/s':>8} {'tok/s':>9} {'pad':>6} "
          f"{'GFLOP/s':>7} {'peak':>7} {'MFU':>6} {'best':>6} {'HFU':>6} {'peakRSS':>8} "
          f"{'Δ RSS':>8} {'16N+A':>8} {'4N':>7}")
LEGEND = ("MFU: model FLOPs on non-pad tokens / time / matmul peak; best: the same for the "
          "fastest timed step; HFU: FLOPs over the padded width the kernels ran. Memory in MB: "
          "Δ RSS = peak RSS during train_loop minus RSS before the model was built; 16N+A = "
          "weights + grads + AdamW state + activations autograd saves on the widest batch; "
          "4N = what a second (reference) copy of the weights would add.")


def report(results: dict[str, dict[str, Any]]) -> None:
    print(HEADER)
    for name, r in results.items():
        print(_row(name, r))
    print(LEGEND)
    for name, r in results.items():
        m = r["memory"]
        print(f"{name}: data {r['options']['data']}, max_length {r['options']['max_length']}, "
              f"threads {r['torch_threads']}, attn {r['attn_implementation']}, "
              f"layout {r['layout']}, "
              f"mixed precision {r['options']['mixed_precision']}, "
              f"load avg {r['load_average_before']} -> {r['load_average_after']}, matmul peak "
              f"before {r['matmul_peak_gflop_per_s']['before']} after "
              f"{r['matmul_peak_gflop_per_s']['after']}, padding executed "
              f"{r['padding_share_executed']:.1%}, live models mid-run "
              f"{m['live_models_mid_run']} ({m['live_param_mb_mid_run']} MB of parameters), "
              f"RSS before/after model {m['rss_before_model_mb']}/{m['rss_after_model_mb']}, "
              f"widest batch {m['widest_batch_shape']}, step s {r['step_seconds']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["tiny", "30m", "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default per config)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--data", choices=DATA, default="toy",
                    help="toy pairs, or long PKU-SafeRLHF-shaped pairs with a chat template")
    ap.add_argument("--max-length", type=int, default=None,
                    help="default: 192 (toy, params.yaml) or 512 (pku)")
    ap.add_argument("--pairs", type=int, default=1000, help="rows generated")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                    help="attention implementation (default: the model's, sdpa)")
    ap.add_argument("--chunks", type=int, default=None,
                    help="length-sorted groups per padded forward pass (default: the library's "
                         "choice for the device, logps.forward_layout; 1 = one padded forward)")
    ap.add_argument("--layout", choices=["default", *get_args(LayoutKind)], default="default",
                    help="forward layout (default: logps.forward_layout's choice for the device, "
                         "as train.layout: null)")
    ap.add_argument("--reference-model", action="store_true",
                    help="counterfactual: hold a reference model and run it every step")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (give it --warmup 2: step 1 compiles)")
    ap.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto",
                    help="as train.mixed_precision (auto = fp32 on CPU); MFU is then against "
                         "the bf16 matmul peak")
    ap.add_argument("--memory-exact", action="store_true",
                    help="pin glibc's mmap threshold so peak RSS tracks live tensors (slower)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if args.warmup is not None and args.warmup < 1:
        ap.error("--warmup must be >= 1: the first step allocates AdamW state")

    if args.max_length is None:
        args.max_length = DEFAULT_MAX_LENGTH[args.data]
    names = ["tiny", "30m"] if args.config == "both" else [args.config]
    results: dict[str, dict[str, Any]] = {}
    if len(names) == 1:
        name = names[0]
        opt = Options(config=name, data=args.data, steps=args.steps or DEFAULT_STEPS[name],
                      warmup=DEFAULT_WARMUP[name] if args.warmup is None else args.warmup,
                      batch_size=args.batch_size, max_length=args.max_length, pairs=args.pairs,
                      threads=args.threads, attn=args.attn, chunks=args.chunks,
                      layout=None if args.layout == "default" else args.layout,
                      reference_model=args.reference_model, compile=args.compile,
                      memory_exact=args.memory_exact, mixed_precision=args.mixed_precision)
        results[name] = asdict(run_one(opt))
    else:
        # One process per configuration: each peak RSS is then that configuration's alone.
        common = ["--data", args.data, "--batch-size", str(args.batch_size),
                  "--max-length", str(args.max_length),
                  "--pairs", str(args.pairs), "--threads", str(args.threads),
                  "--layout", args.layout]
        common += ["--chunks", str(args.chunks)] if args.chunks is not None else []
        common += ["--attn", args.attn] if args.attn else []
        common += ["--steps", str(args.steps)] if args.steps else []
        common += ["--warmup", str(args.warmup)] if args.warmup is not None else []
        common += ["--reference-model"] if args.reference_model else []
        common += ["--compile"] if args.compile else []
        common += ["--memory-exact"] if args.memory_exact else []
        common += ["--mixed-precision", args.mixed_precision]
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                subprocess.run([sys.executable, __file__, *common, "--config", name,
                                "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
                results[name] = json.loads(out.read_text())[name]
    report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
