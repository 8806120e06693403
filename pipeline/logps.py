"""Scoring: sequence log-probabilities, the one function shared by reference precomputation,
training and evaluation (`batch_logps`), plus padding collate, the forward layout, batched
scoring of sequences and of both responses of pairs.

`batch_logps` projects through the LM head only the positions that carry a label, in chunks
(`LabelLogps`), for the models where that split is exact (`lm_head_of`); for any other it keeps
the full (B, T, V) logits and `sequence_logps`, the pure reference both are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.autograd.function import FunctionCtx
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pipeline.encoding import IGNORE, Encoded, Encoder, TruncationStats
from pipeline.precision import MixedPrecision, autocast


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens of each sequence, and how many there are.

    logits: (B, T, V) from a causal LM; labels: (B, T) with -100 where nothing is scored.
    Position t predicts token t+1, hence the shift. Returns (logps (B,), n_tokens (B,)).

    fp32 logits: the fused log-softmax, whose kernels are the fastest on CPU (fwd + bwd 57 ms
    against 78 ms for logsumexp at 64 × 150 × 1024) for the same memory. Half-precision logits
    (bf16 autocast): `TokenLogps`, in fp32 a chunk of rows at a time, with a hand-written
    backward, so neither an fp32 copy of the (B, T, V) logits nor a second (B, T, V) gradient
    ever exists, and the sum keeps fp32 accuracy.
    """
    # Shift by padding the labels rather than slicing the logits: a slice of the (B, T, V)
    # logits is not contiguous, and reshaping it for the chunks would copy all of it.
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = shifted != IGNORE
    safe_labels = torch.where(mask, shifted, 0)
    if logits.dtype == torch.float32:
        token_logps = torch.gather(logits.log_softmax(-1), 2,
                                   safe_labels.unsqueeze(-1)).squeeze(-1)
    else:
        token_logps = TokenLogps.apply(logits, safe_labels)
    token_logps = token_logps * mask
    return token_logps.sum(-1), mask.sum(-1)


class TokenLogps(torch.autograd.Function):
    """log softmax(logits)[label] per position, in fp32, over row chunks of half-precision
    logits. Backward writes d/dlogits = g·(onehot(label) − softmax) chunk by chunk into one
    gradient in the logits' dtype: the only (B, T, V) tensors alive are the logits (which
    autograd keeps anyway) and their gradient."""

    CHUNK_ROWS = 1024

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        idx = labels.reshape(-1)
        out = torch.empty(idx.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, flat.shape[0], TokenLogps.CHUNK_ROWS):
            rows = slice(start, start + TokenLogps.CHUNK_ROWS)
            chunk = flat[rows].float()
            lse[rows] = chunk.logsumexp(-1)
            out[rows] = chunk.gather(1, idx[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(logits, labels, lse)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        idx = labels.reshape(-1)
        g = grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], TokenLogps.CHUNK_ROWS):
            rows = slice(start, start + TokenLogps.CHUNK_ROWS)
            soft = (flat[rows].float() - lse[rows, None]).exp_().mul_(-g[rows, None])
            soft.scatter_add_(1, idx[rows, None], g[rows, None])
            grad[rows] = soft
        return grad.view_as(logits), None


#: The batch key of the flat positions (N,) that carry a label (`label_positions`).
SCORED = "scored_positions"


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: pad token in `input_ids`, 0 in `attention_mask`, -100 in `labels`."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    # Where log-probs are scored, found here on the host: a one-group forward on a GPU then
    # reads nothing back from the device before it runs (`batch_logps`).
    return {"input_ids": ids, "attention_mask": attn, "labels": labels,
            SCORED: label_positions(labels)[0]}


def forward_groups(setting: int | None, on: torch.device | str) -> int:
    """Length groups per forward pass: `setting` if given, else what measured fastest on the
    device type: 4 on CPU (padding ~40% -> ~10%, 1.6x at 30M params, bench/bench_train.py),
    1 on a GPU, where each extra launch costs more than the padding it saves (issue #9's H200
    runs: 920 vs 222 pairs/s at 110M params)."""
    if setting is not None:
        return setting
    return 4 if torch.device(on).type == "cpu" else 1


# --- log-probs from hidden states at label positions only ----------------------------------

#: `model_type`s whose `*ForCausalLM.forward` returns exactly `lm_head(x)` of the head's input x
#: (read in transformers 5.24: nothing touches the logits after the head), and those that then
#: multiply them by a constant they keep in `logit_scale` (Cohere). Anything else, Gemma-2/3's
#: `final_logit_softcapping` and Granite's `logits_scaling` among them, keeps the full logits.
_PLAIN_HEAD = frozenset({
    "deepseek_v3", "falcon", "gemma", "glm4", "gpt2", "gpt_neox", "gptj", "llama", "ministral",
    "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "smollm3", "stablelm", "starcoder2"})
_SCALED_HEAD = frozenset({"cohere", "cohere2"})
#: Config fields by which some models transform their logits after the head: a plain model
#: type that sets one (a later transformers, a hand-edited config) keeps the full logits.
_POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "lm_head_multiplier", "output_multiplier")


@dataclass(frozen=True)
class LMHead:
    """The output projection of a causal LM whose logits are exactly `scale · (x Wᵀ + b)`, x
    being what the model feeds its `lm_head` module; W may be tied to the input embedding."""

    module: torch.nn.Linear
    scale: float = 1.0


def lm_head_of(model: torch.nn.Module) -> LMHead | None:
    """The LM head to compute log-probs from hidden states with, or None where the split is not
    sure to be exact and `batch_logps` keeps today's full logits (`sequence_logps`).

    `model` may be wrapped by DDP and by peft (LoRA injects its layers in place; its wrapper
    only forwards). Refused: models outside `_PLAIN_HEAD`/`_SCALED_HEAD` or with remote code
    (the forward is unknown), a head that is not a plain `nn.Linear` (LoRA on `lm_head`, a
    quantized layer), and sharded or offloaded weights (FSDP, DeepSpeed, a `device_map`), which
    are only whole inside the model's own forward.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if callable(getattr(model, "get_base_model", None)):  # peft's PeftModel
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) \
            or not type(model).__module__.startswith("transformers.models."):
        return None
    kind = model.config.model_type
    if kind not in _PLAIN_HEAD | _SCALED_HEAD:
        return None
    if kind in _PLAIN_HEAD and any(getattr(model.config, f, None) is not None
                                   for f in _POST_HEAD_FIELDS):
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or hasattr(head, "_hf_hook"):
        return None
    for p in head.parameters():
        if type(p) is not torch.nn.Parameter or p.device.type == "meta" or hasattr(p, "ds_id"):
            return None
    scale = float(model.logit_scale) if kind in _SCALED_HEAD else 1.0
    return LMHead(head, scale)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a log-prob is scored: (flat positions (N,) into the B·T hidden states, their
    labels (N,), tokens per sequence (B,)), from labels (B, T) with -100 where nothing is
    scored. Position t predicts token t+1, hence the shift, as in `sequence_logps`.

    `nonzero` waits for the device once; `batch_logps` calls this before the forward pass, when
    the queue holds nothing else."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = shifted != IGNORE
    pos = mask.view(-1).nonzero().squeeze(1)
    return pos, shifted.view(-1)[pos], mask.sum(-1)


#: `torch.addmm(..., out_dtype=)` from half inputs, CUDA only.
_CUDA_MM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def _fp32_addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc`. From half-precision inputs on CUDA, cuBLAS writes the
    product in fp32 (torch >= 2.8), as TRL's kernel does; elsewhere a half product is rounded
    once per chunk, as the full-logits path rounds the whole (bf16) gradient once."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _CUDA_MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


class LabelLogps(torch.autograd.Function):
    """log softmax(scale · (h Wᵀ + b))[label] at N positions, `chunk` rows at a time, in fp32.

    h (N, H) is in the dtype the head computes in (bf16 under autocast, as `lm_head` would
    cast it); W (V, H) and b (V,) are the master parameters, cast per call. Each chunk's
    logits are a GEMM in that dtype, rounded to it as the model's own logits are, then an fp32
    logsumexp. Backward recomputes each chunk's logits and softmax and turns them into
    dz = g·(onehot(label) − softmax); grad h = dz W, grad W += dzᵀ h (accumulated in fp32),
    grad b += Σ dz. Peak memory grows with chunk × V, not with B·T·V. The loop runs over
    Python ints, so nothing waits for the device.
    """

    #: Logits per chunk: 2^25 (1,024 rows at V = 32k) hold ~0.3 GB in fp32, their half copy
    #: and the logsumexp's temporary.
    CHUNK_LOGITS = 1 << 25

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, labels: torch.Tensor, scale: float, chunk: int
                ) -> torch.Tensor:
        dtype, on = hidden.dtype, hidden.device.type
        out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        # Explicit dtypes: whatever autocast is active around the call must not recast them.
        with torch.autocast(on, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, labels.shape[0], chunk):
                rows = slice(start, start + chunk)
                z = _chunk_logits(hidden[rows], w, b, scale)
                lse[rows] = torch.logsumexp(z, -1)
                out[rows] = z.gather(1, labels[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                            None, None, None]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, on = hidden.dtype, hidden.device.type
        g = grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        with torch.autocast(on, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, labels.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows]
                dz = _chunk_logits(h, w, b, ctx.scale).sub_(lse[rows, None]).exp_()
                dz.mul_(-g[rows, None]).scatter_add_(1, labels[rows, None], g[rows, None])
                if ctx.scale != 1.0:
                    dz.mul_(ctx.scale)
                if grad_b is not None:
                    grad_b.add_(dz.sum(0))
                dz = dz.to(dtype)
                if grad_h is not None:
                    torch.mm(dz, w, out=grad_h[rows])
                if grad_w is not None:
                    _fp32_addmm_(grad_w, dz.t(), h)
        return (grad_h,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float
                  ) -> torch.Tensor:
    """fp32 logits (n, V) of a chunk, rounded first to the head's dtype as `lm_head` (and a
    Cohere model's scaling, in that dtype) would round them; a no-op copy in fp32."""
    z = torch.nn.functional.linear(h, w, b)
    if scale != 1.0:
        z = z * scale
    return z.float()


def chunk_rows(vocab: int) -> int:
    """Rows per `LabelLogps` chunk: about `LabelLogps.CHUNK_LOGITS` logits."""
    return max(1, LabelLogps.CHUNK_LOGITS // vocab)


def hidden_logps(hidden: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor,
                 head: LMHead, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """Summed log-prob of the labels of each sequence (B,) from the head's input hidden
    (B, T, H), at flat positions `pos` (N,) with their `labels` (N,) (`label_positions`),
    computed in `dtype` (the head's autocast dtype, or its own)."""
    rows, width = hidden.shape[:2]
    h = hidden.reshape(rows * width, -1).index_select(0, pos).to(dtype)
    lp = LabelLogps.apply(h, head.module.weight, head.module.bias, labels, head.scale, chunk)
    # Back into a zero (B, T) grid and summed along T: the order of the full-logits path's sum,
    # deterministic (an index_add_ would sum with atomics on a GPU).
    grid = torch.zeros(rows * width, dtype=lp.dtype, device=lp.device).index_copy(0, pos, lp)
    return grid.view(rows, width).sum(-1)


@contextmanager
def _head_input(head: LMHead) -> Iterator[list[tuple[torch.Tensor, torch.dtype]]]:
    """Catch what the model feeds its LM head, with the dtype the head would compute in, and
    feed the head an empty slice instead: the model's own logits come out (B, 0, V), so
    neither the (B, T, V) logits nor accelerate's fp32 copy of them are ever made."""
    seen: list[tuple[torch.Tensor, torch.dtype]] = []

    def grab(module: torch.nn.Module, args: tuple[torch.Tensor, ...]
             ) -> tuple[torch.Tensor, ...]:
        x = args[0]
        on = x.device.type
        dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else x.dtype
        seen.append((x, dtype))
        return (x[..., :0, :], *args[1:])

    handle = head.module.register_forward_pre_hook(grab)
    try:
        yield seen
    finally:
        handle.remove()


def batch_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor], groups: int = 1,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a collated batch and return (logps (B,), n_tokens (B,)), in batch order.

    Where `lm_head_of(model)` vouches for the model, the LM head projects only the positions
    with a label, `chunk` rows at a time (default `chunk_rows(V)`) through `LabelLogps`: no
    logits at prompt or padding positions, and none of (B, T, V) size. Otherwise the model
    returns its full logits and `sequence_logps` scores them. Both agree to float rounding.

    With `groups > 1` the sequences run as that many length-sorted groups, each cut to its own
    longest sequence. Padding is on the right and attention is causal, so only padding is cut
    and the result is the same up to float rounding; a random batch of toy pairs is ~40%
    padding, a group of sorted ones ~10% (bench/bench_train.py: 1.6x faster at 30M params).
    """
    head = lm_head_of(model)
    if groups <= 1 and head is not None and SCORED in batch:
        return _one_group_logps(model, batch, head, chunk)
    lengths = batch["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    splits = torch.tensor_split(order, max(1, min(groups, len(order))))
    # Every group's width and label positions first: the host waits for the device here, when
    # it has queued nothing, and never between the groups' forward passes.
    widths = [int(w) for w in torch.stack([lengths[idx].max() for idx in splits]).tolist()]
    labels = [batch["labels"][idx, :w] for idx, w in zip(splits, widths, strict=True)]
    where = [label_positions(lab) for lab in labels] if head is not None else []
    lps, ns = [], []
    for k, (idx, width) in enumerate(zip(splits, widths, strict=True)):
        inputs = {"input_ids": batch["input_ids"][idx, :width],
                  "attention_mask": batch["attention_mask"][idx, :width], "use_cache": False}
        if head is None:
            lp, n = sequence_logps(model(**inputs).logits, labels[k])
        else:
            with _head_input(head) as seen:
                out = model(**inputs)
            if not seen:  # the model never called its head: its logits are the full ones
                lp, n = sequence_logps(out.logits, labels[k])
            else:
                hidden, dtype = _fed_once(model, seen, len(idx), width)
                pos, lab, n = where[k]
                lp = hidden_logps(hidden, pos, lab, head, dtype,
                                  chunk or chunk_rows(head.module.out_features))
        lps.append(lp)
        ns.append(n)
    inverse = torch.argsort(torch.cat(splits))
    return torch.cat(lps)[inverse], torch.cat(ns)[inverse]


def _fed_once(model: PreTrainedModel, seen: list, rows: int, width: int
              ) -> tuple[torch.Tensor, torch.dtype]:
    """The (hidden, dtype) the model fed its head; a guard for a model that breaks what
    `lm_head_of` vouched for (one call with the whole (rows, width, H) batch)."""
    hidden, dtype = seen[0]
    if len(seen) > 1 or hidden.shape[:2] != (rows, width):
        raise RuntimeError(
            f"{type(model).__name__} fed its LM head {len(seen)} time(s), first "
            f"{tuple(hidden.shape)}, not once (B, T, H) = ({rows}, {width}, H)")
    return hidden, dtype


def _one_group_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor], head: LMHead,
                     chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_logps` in one forward pass over the batch as collated, with the label positions
    `collate` found on the host: nothing is read back from the device (on a GPU the host keeps
    queueing work while the previous step runs)."""
    labels = batch["labels"]
    with _head_input(head) as seen:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False)
    if not seen:  # the model never called its head: its logits are the full ones
        return sequence_logps(out.logits, labels)
    hidden, dtype = _fed_once(model, seen, *labels.shape)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    pos = batch[SCORED]
    lp = hidden_logps(hidden, pos, shifted.reshape(-1).index_select(0, pos), head, dtype,
                      chunk or chunk_rows(head.module.out_features))
    return lp, (shifted != IGNORE).sum(-1)


def token_batches(sorted_lengths: np.ndarray, max_rows: int, max_tokens: int | None
                  ) -> list[tuple[int, int]]:
    """(start, stop) of consecutive batches of ascending lengths: at most `max_rows` rows, and
    rows × longest length at most `max_tokens` (a longer sequence still gets a batch alone)."""
    out, start = [], 0
    for i, n in enumerate(sorted_lengths):
        rows = i - start + 1
        if rows > max_rows or (max_tokens is not None and rows > 1 and rows * n > max_tokens):
            out.append((start, i))
            start = i
    if len(sorted_lengths):
        out.append((start, len(sorted_lengths)))
    return out


@torch.inference_mode()
def score_sequences(
    model: PreTrainedModel, encoded: Sequence[Encoded], pad_id: int, batch_size: int,
    device: torch.device | str = "cpu", desc: str = "log-probs",
    mixed_precision: MixedPrecision = "auto", max_tokens: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of many sequences, in their input order, under the autocast
    that training uses for `mixed_precision` (so a policy equal to its reference scores alike).

    Batches are formed from length-sorted sequences, which cuts padding to a few percent, and
    hold at most `batch_size` rows and `max_tokens` padded tokens, so the logits of a batch of
    long sequences stay within memory whatever their length.
    """
    model.eval()
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    logps = np.zeros(len(encoded), dtype=np.float64)
    ntok = np.zeros(len(encoded), dtype=np.int64)
    batches = token_batches(lengths[order], batch_size, max_tokens)
    for start, stop in tqdm(batches, desc=desc, unit="batch", disable=len(batches) <= 1):
        idx = order[start:stop]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        with autocast(mixed_precision, device):
            lp, n = batch_logps(model, batch)
        logps[idx] = lp.double().cpu().numpy()
        ntok[idx] = n.cpu().numpy()
    return logps, ntok


def pair_logps(
    model: PreTrainedModel, encoder: Encoder, pairs: pd.DataFrame, batch_size: int,
    device: torch.device | str = "cpu", mixed_precision: MixedPrecision = "auto",
    stats: TruncationStats | None = None, desc: str = "pair log-probs",
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """Summed log-prob and token count of both responses of every pair under `model`, keyed by
    `pair_id`: the reference's (by `ref_logps`) or the policy's (by `evaluate`). Both sides of
    a pair are cut once, by the pair rule (`Encoder.pairs`)."""
    n = len(pairs)
    encoded = encoder.pairs(pairs["prompt"].tolist(), pairs["response_0"].tolist(),
                            pairs["response_1"].tolist(), stats)
    seqs = [a for a, _ in encoded] + [b for _, b in encoded]
    logps, ntok = score_sequences(model, seqs, encoder.tokenizer.pad_token_id, batch_size,
                                  device, desc=desc, mixed_precision=mixed_precision,
                                  max_tokens=max_tokens)
    return pd.DataFrame({
        "pair_id": pairs["pair_id"].to_numpy(),
        "logp_0": logps[:n], "logp_1": logps[n:],
        "ntok_0": ntok[:n].astype(np.int32), "ntok_1": ntok[n:].astype(np.int32),
    })
