"""Scoring: sequence log-probabilities, the one function shared by reference precomputation,
training and evaluation, plus padding collate, the forward layout, batched scoring of sequences
and of both responses of pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def forward_groups(setting: int | None, on: torch.device | str) -> int:
    """Length groups per forward pass: `setting` if given, else what measured fastest on the
    device type: 4 on CPU (padding ~40% -> ~10%, 1.6x at 30M params, bench/bench_train.py),
    1 on a GPU, where each extra launch costs more than the padding it saves (issue #9's H200
    runs: 920 vs 222 pairs/s at 110M params)."""
    if setting is not None:
        return setting
    return 4 if torch.device(on).type == "cpu" else 1


def batch_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor], groups: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a collated batch and return (logps (B,), n_tokens (B,)), in batch order.

    With `groups > 1` the sequences run as that many length-sorted groups, each cut to its own
    longest sequence. Padding is on the right and attention is causal, so only padding is cut
    and the result is the same up to float rounding; a random batch of toy pairs is ~40%
    padding, a group of sorted ones ~10% (bench/bench_train.py: 1.6x faster at 30M params).
    """
    lengths = batch["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    lps, ns, idxs = [], [], []
    for idx in torch.tensor_split(order, max(1, min(groups, len(order)))):
        width = int(lengths[idx].max())
        out = model(input_ids=batch["input_ids"][idx, :width],
                    attention_mask=batch["attention_mask"][idx, :width], use_cache=False)
        lp, n = sequence_logps(out.logits, batch["labels"][idx, :width])
        lps.append(lp)
        ns.append(n)
        idxs.append(idx)
    inverse = torch.argsort(torch.cat(idxs))
    return torch.cat(lps)[inverse], torch.cat(ns)[inverse]


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
