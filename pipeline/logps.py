"""Scoring: sequence log-probabilities, the one function shared by reference precomputation,
training and evaluation (`batch_logps`), plus the forward layouts (padded `collate`, padding-free
`pack`, `forward_layout`), batched scoring of sequences and of both responses of pairs.

`batch_logps` projects through the LM head only the positions that carry a label, in chunks
(`lm_head.LabelLogps`), for the models where that split is exact (`lm_head.lm_head_of`); for any
other it keeps the full (B, T, V) logits and `sequence_logps`, the pure reference both are
tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.autograd.function import FunctionCtx
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pipeline.encoding import IGNORE, Encoded, Encoder, TruncationStats
from pipeline.errors import UserError
from pipeline.lm_head import LMHead, chunk_rows, head_input, hidden_logps, lm_head_of, unwrap
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


#: Batch keys of where log-probs are scored, found on the host by `collate` / `pack` (a forward
#: then reads nothing back from the device before it runs): flat positions (N,) into the
#: forward's rows × width hidden states; for packed batches also the labels there (N,), the flat
#: positions (N,) of the (sequences, width) grid that sums them per sequence, and the tokens
#: scored per sequence (S,).
SCORED = "scored_positions"
SCORED_LABELS = "scored_labels"
SCORED_INTO = "scored_into"
SEQ_TOKENS = "sequence_tokens"


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
    return {"input_ids": ids, "attention_mask": attn, "labels": labels,
            SCORED: label_positions(labels)[0]}


def pack(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free layout: the sequences laid end to end in rows as wide as the longest one
    (first-fit decreasing), each with its own `position_ids` from 0 and no `attention_mask`,
    from which transformers builds a block-causal mask (or flash-attention's varlen offsets),
    so no token attends across a boundary. Only the ends of rows hold padding: a batch of 64
    toy sequences drops from ~45% padding to ~9%, in one forward pass.

    Returns input_ids and position_ids (rows, width), and the scored positions under `SCORED`,
    `SCORED_LABELS`, `SCORED_INTO`, `SEQ_TOKENS`; `batch_logps` returns in `batch` order.
    """
    lengths = [len(e.input_ids) for e in batch]
    width = max(lengths)
    free: list[int] = []  # room left in each row
    where = [(0, 0)] * len(batch)  # (row, offset) of each sequence
    for i in sorted(range(len(batch)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        where[i] = (row, width - free[row])
        free[row] -= lengths[i]
    ids = np.full((len(free), width), pad_id, dtype=np.int64)
    # Row padding counts on from its column: a segment of its own, after every real token.
    positions = np.tile(np.arange(width, dtype=np.int64), (len(free), 1))
    src, labels, into, n_tok = [], [], [], []
    for i, (e, (row, off)) in enumerate(zip(batch, where, strict=True)):
        n = lengths[i]
        ids[row, off:off + n] = e.input_ids
        positions[row, off:off + n] = np.arange(n)
        # Position t predicts token t + 1 of the same sequence.
        nxt = np.asarray(e.labels[1:], dtype=np.int64)
        t = np.flatnonzero(nxt != IGNORE)
        src.append(row * width + off + t)
        into.append(i * width + t)
        labels.append(nxt[t])
        n_tok.append(len(t))
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions),
            SCORED: torch.from_numpy(np.concatenate(src)),
            SCORED_LABELS: torch.from_numpy(np.concatenate(labels)),
            SCORED_INTO: torch.from_numpy(np.concatenate(into)),
            SEQ_TOKENS: torch.tensor(n_tok, dtype=torch.long)}


#: `model_type`s whose attention honours packed `position_ids` (a new sequence wherever the
#: position does not count on by one) in transformers 5.24, each checked against the padded
#: layout by tests/test_logps.py. Left out: OPT (positions from the attention mask), GPT-2
#: (warns of padding without a mask), anything untested.
PACKABLE = frozenset({
    "cohere", "falcon", "gemma", "glm4", "gpt_neox", "gptj", "llama", "mistral", "mixtral",
    "olmo", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
    "stablelm", "starcoder2"})


def packing_refusal(model: torch.nn.Module) -> str | None:
    """Why `model` cannot run packed batches, or None if it can: packing needs the label-position
    head (`lm_head_of`), since no packed row holds one sequence's full logits, and a model type
    tested to honour packed `position_ids`."""
    if lm_head_of(model) is None:
        return "its log-probs need the full logits (lm_head_of refuses the model)"
    kind = unwrap(model).config.model_type
    if kind not in PACKABLE:
        return f"model type {kind!r} is not one tested with packed position_ids"
    return None


@dataclass(frozen=True)
class ForwardLayout:
    """How a training micro-batch goes through the model: packed (`pack`), or padded
    (`collate`) and run as `groups` length-sorted groups. The one place that pairs the collate
    with the forward."""

    packed: bool = False
    groups: int = 1

    def collate(self, batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        return pack(batch, pad_id) if self.packed else collate(batch, pad_id)

    def logps(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_logps(model, batch, self.groups)

    def describe(self) -> str:
        return "packed" if self.packed else f"padded, {self.groups} group(s)"


def forward_layout(packing: bool | None, groups: int | None, model: torch.nn.Module,
                   on: torch.device | str) -> ForwardLayout:
    """The layout of `train.packing` and `train.forward_groups`; null means what measured
    fastest on the device type (docs/benchmarks.md):
    - CPU: 4 length groups (padding ~45% -> ~17%: 1.6x at 30M params against one padded
      forward). Packing (~9%) measured the same there (3.95 vs 4.01 s per 32 pairs, within
      noise): the groups are kept.
    - GPU: one padded forward, where each extra launch costs more than the padding it saves
      (issue #9's H200 runs: 920 vs 222 pairs/s at 110M params). Packing runs the same one
      forward with a fifth of the padding, but is opt-in until measured on a GPU.
    `packing: true` on a model that cannot honour it (`packing_refusal`) is a `UserError`."""
    if packing:
        refusal = packing_refusal(model)
        if refusal is not None:
            raise UserError(f"train.packing: true, but this model cannot run packed: {refusal}; "
                            "set packing: false or null")
        return ForwardLayout(packed=True)
    cpu = torch.device(on).type == "cpu"
    return ForwardLayout(groups=groups if groups is not None else 4 if cpu else 1)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a log-prob is scored: (flat positions (N,) into the B·T hidden states, their
    labels (N,), tokens per sequence (B,)), from labels (B, T) with -100 where nothing is
    scored. Position t predicts token t+1, hence the shift, as in `sequence_logps`."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = shifted != IGNORE
    pos = mask.view(-1).nonzero().squeeze(1)
    return pos, shifted.view(-1)[pos], mask.sum(-1)


def batch_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor], groups: int = 1,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a collated (`collate`) or packed (`pack`) batch and return (logps (S,),
    n_tokens (S,)), in the order of the sequences given to the collate.

    Where `lm_head_of(model)` vouches for the model, the LM head projects only the positions
    with a label, `chunk` rows at a time (default `chunk_rows(V)`) through `LabelLogps`: no
    logits at prompt or padding positions, and none of (B, T, V) size. Otherwise the model
    returns its full logits and `sequence_logps` scores them. Both agree to float rounding.

    A padded batch with `groups > 1` runs as that many length-sorted groups, each cut to its
    own longest sequence. Padding is on the right and attention is causal, so only padding is
    cut and the result is the same up to float rounding; a random batch of toy pairs is ~40%
    padding, a group of sorted ones ~10% (bench/bench_train.py: 1.6x faster at 30M params).
    """
    head = lm_head_of(model)
    if "position_ids" in batch:
        if head is None:
            raise ValueError(f"a packed batch needs the label-position head: "
                             f"{packing_refusal(model)}")
        return _packed_logps(model, batch, head, chunk)
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
            with head_input(head) as seen:
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
    if not seen:
        raise RuntimeError(f"{type(model).__name__} never called its LM head")
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
    with head_input(head) as seen:
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


def _packed_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor], head: LMHead,
                  chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_logps` of a packed batch: one forward pass with per-sequence `position_ids` and
    no attention mask (what makes transformers mask across the packed sequences), then the
    scored positions summed per sequence through a (sequences, width) grid."""
    ids = batch["input_ids"]
    with head_input(head) as seen:
        model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False)
    hidden, dtype = _fed_once(model, seen, *ids.shape)
    n_tok = batch[SEQ_TOKENS]
    lp = hidden_logps(hidden, batch[SCORED], batch[SCORED_LABELS], head, dtype,
                      chunk or chunk_rows(head.module.out_features),
                      into=batch[SCORED_INTO], sequences=len(n_tok))
    return lp, n_tok


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
