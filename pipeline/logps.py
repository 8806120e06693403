"""Scoring: summed log-probabilities of the labelled tokens of sequences, the one computation
shared by reference precomputation, training and evaluation. Read from the top:

1. `sequence_logps`: the plain definition, from full (B, T, V) logits; every faster path is
   tested against it.
2. `batch_logps`: what the stages call on a collated or packed batch. For a model in
   `lm_head.MODEL_TYPES` the LM head projects only the positions that carry a label, in chunks
   (`lm_head.LabelLogps`); any other model returns its full logits to `sequence_logps`.
3. `score_sequences`, `pair_logps`: many sequences (both responses of pairs) in length-sorted
   batches, under the training autocast.
4. `ForwardLayout`, `forward_layout`: how a training batch is laid out (padded in length
   groups, packed, shared prompts) and which layouts a model may run (`packing_refusal`).
5. `TokenLogps`: the chunked half-precision kernel `sequence_logps` uses for bf16 logits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.autograd.function import FunctionCtx
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pipeline.config import LayoutKind
from pipeline.encoding import IGNORE, Encoded, Encoder, TruncationStats
from pipeline.errors import UserError
from pipeline.layouts import (
    BRANCHES,
    SCORED,
    SCORED_INTO,
    SCORED_LABELS,
    SEQ_TOKENS,
    UNITS,
    cheapest,
    collate,
    label_positions,
    layout_of,
    pack,
    shared_prompt_mask,
    token_batches,
)
from pipeline.lm_head import (
    MODEL_TYPES,
    LMHead,
    chunk_rows,
    head_input,
    hidden_logps,
    lm_head_of,
    unwrap,
)
from pipeline.precision import MixedPrecision, autocast


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens of each sequence, and how many there are.

    logits: (B, T, V) from a causal LM; labels: (B, T) with -100 where nothing is scored.
    Position t predicts token t+1, hence the shift. Returns (logps (B,), n_tokens (B,)).

    fp32 logits: the fused log-softmax, whose kernels are the fastest on CPU for the same
    memory (docs/benchmarks.md, "Figures behind the defaults"). Half-precision logits
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
    padding, a group of sorted ones ~10% (the speed-up: docs/benchmarks.md).
    """
    head = lm_head_of(model)
    if "position_ids" in batch:
        if head is None:
            raise ValueError(f"a packed batch needs the label-position head: "
                             f"{packing_refusal(model, 'packed')}")
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
    no attention mask (what makes transformers mask across the packed sequences), or the mask of
    shared prompts; then the scored positions summed per sequence through a (sequences, width)
    grid."""
    ids = batch["input_ids"]
    mask = None
    if UNITS in batch:
        config = unwrap(model).config
        window = sliding_window(config)
        if window is not None and window < ids.shape[1]:
            # The ready mask replaces the model's own, sliding window included.
            raise UserError(f"layout shared_prompts: packed rows of {ids.shape[1]} tokens are "
                            f"wider than the model's sliding window ({window}); use layout: "
                            "packed or padded")
        mask = shared_prompt_mask(batch[UNITS], batch[BRANCHES], config._attn_implementation,
                                  next(model.parameters()).dtype)
    with head_input(head) as seen:
        model(input_ids=ids, position_ids=batch["position_ids"], attention_mask=mask,
              use_cache=False)
    hidden, dtype = _fed_once(model, seen, *ids.shape)
    n_tok = batch[SEQ_TOKENS]
    lp = hidden_logps(hidden, batch[SCORED], batch[SCORED_LABELS], head, dtype,
                      chunk or chunk_rows(head.module.out_features),
                      into=batch[SCORED_INTO], sequences=len(n_tok))
    return lp, n_tok


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
    # An FSDP2 model (SFT's held-out loss under sharding) gathers its parameters into
    # tensors it updates in place again in training: inference tensors would refuse that.
    with torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode():
        return _score_sequences(model, encoded, pad_id, batch_size, device, desc,
                                mixed_precision, max_tokens)


def _score_sequences(
    model: PreTrainedModel, encoded: Sequence[Encoded], pad_id: int, batch_size: int,
    device: torch.device | str, desc: str, mixed_precision: MixedPrecision,
    max_tokens: int | None,
) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class ForwardLayout:
    """How a training micro-batch goes through the model: padded (`collate`) and run as
    `groups` length-sorted groups, packed (`pack`), packed with each prompt computed once for
    all its responses (`pack(share_prompts=True)`), or, `auto`, whichever of these
    `layouts.cheapest` finds cheapest for each batch (shared prompts only if
    `share_prompts`). The one place that pairs the collate with the forward."""

    kind: LayoutKind = "padded"
    groups: int = 1
    attn_cost: float = 0.0  # `attention_cost` of the model: packed row width, `auto`'s choice
    share_prompts: bool = True  # `auto` may share prompts
    # Batches collated in each layout, for the log: what `auto` chose.
    census: Counter[str] = field(default_factory=Counter, compare=False, repr=False)

    def collate(self, batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        if self.kind == "padded":
            out = collate(batch, pad_id)
        elif self.kind == "auto":
            out = cheapest(batch, pad_id, self.groups, self.attn_cost, self.share_prompts)
        else:
            out = pack(batch, pad_id, self.kind == "shared_prompts", self.attn_cost)
        self.census[layout_of(out)] += 1
        return out

    def logps(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_logps(model, batch, self.groups)

    def describe(self) -> str:
        padded = f"padded, {self.groups} group(s)"
        if self.kind == "auto":
            shared = ", packed or shared prompts" if self.share_prompts else " or packed"
            chosen = ", ".join(f"{n} {k}" for k, n in sorted(self.census.items()))
            return f"auto (per batch: {padded}{shared}){': ' + chosen if chosen else ''}"
        return padded if self.kind == "padded" else self.kind


def forward_layout(kind: LayoutKind | None, groups: int | None, model: torch.nn.Module,
                   on: torch.device | str, processes: int = 1) -> ForwardLayout:
    """The layout of `train.layout` and `train.forward_groups` (default: 4 groups on CPU, 1 on
    a GPU); null means what measured fastest on the device type (docs/benchmarks.md,
    "Figures behind the defaults"):
    - CPU: `auto` where the model can be packed (`packing_refusal`): per batch, the cheapest
      by the FLOP model of padded in 4 length groups, packed and shared prompts. Short toy
      pairs go in shared-prompt rows, long pairs on a small model stay padded.
    - GPU: one padded forward, where each extra launch costs more than the padding it saves.
      The packed layouts run one forward too, with far fewer tokens, but are opt-in there
      until measured on a GPU.
    `auto` shares prompts only where the model allows it and has no sliding window (a window
    narrower than a row would stop the run). With several `processes` its padded choice is one
    forward pass: DDP broadcasts the model's buffers at every forward, so all ranks must run
    as many passes, and each chooses for its own micro-batch. An explicit packed layout that
    the model cannot run is a `UserError`; an explicit `auto` then stays padded."""
    cpu = torch.device(on).type == "cpu"
    padded = ForwardLayout(groups=groups if groups is not None else 4 if cpu else 1)
    if kind is None:
        kind = "auto" if cpu else "padded"
    if kind == "padded" or (kind == "auto" and packing_refusal(model, "packed") is not None):
        return padded
    cost = attention_cost(model)
    if kind == "auto":
        share = sliding_window(unwrap(model).config) is None \
            and packing_refusal(model, "shared_prompts") is None
        return ForwardLayout("auto", padded.groups if processes == 1 else 1, cost, share)
    refusal = packing_refusal(model, kind)
    if refusal is not None:
        raise UserError(f"train.layout: {kind}, but this model cannot run it: {refusal}; "
                        "set layout: padded, auto or null")
    return ForwardLayout(kind, attn_cost=cost)


def packing_refusal(model: torch.nn.Module, kind: LayoutKind) -> str | None:
    """Why `model` cannot run the packed layout `kind`, or None if it can. Packing needs the
    label-position head (`lm_head_of`), since no packed row holds one sequence's full logits,
    a model type and an attention tested with packed rows; shared prompts also need positions
    that come from `position_ids` alone (not ALiBi, which measures distance in columns) and
    rows no wider than a sliding window (checked by `_packed_logps`)."""
    if lm_head_of(model) is None:
        return "its log-probs need the full logits (lm_head_of refuses the model)"
    config = unwrap(model).config
    if not MODEL_TYPES[config.model_type].packable:  # listed: `lm_head_of` vouched for it
        return f"model type {config.model_type!r} is not one tested with packed rows"
    attn = config._attn_implementation
    if attn not in _MASKED_ATTENTION:
        return f"attention {attn!r} is not tested with packed rows (use sdpa or eager)"
    if kind == "shared_prompts" and getattr(config, "alibi", False):
        return "ALiBi measures distances in columns, which shared prompts do not keep"
    return None


#: Attention implementations tested with packed rows. Not flash-attention: it takes no 4D mask
#: (shared prompts), and transformers 5.24 reads packed `position_ids` as varlen offsets only
#: for a batch of one row, so it would attend across the sequences of several.
_MASKED_ATTENTION = frozenset({"sdpa", "eager"})


def attention_cost(model: torch.nn.Module) -> float:
    """FLOPs of attention per query-key pair over FLOPs of the linear layers per token:
    4·L·d / (2·P), P the weights of the layers' matrices (not the embedding, not the head,
    which only runs at label positions). ~1/400 for the tiny default, ~1/3000 at 30M params,
    ~1/25000 for a 7B Llama: wider packed rows pay off as the model grows."""
    m = unwrap(model)
    skip = {id(m.get_input_embeddings().weight), id(m.get_output_embeddings().weight)}
    linear = sum(p.numel() for p in m.parameters() if p.ndim == 2 and id(p) not in skip)
    return 2.0 * m.config.num_hidden_layers * m.config.hidden_size / max(linear, 1)


def sliding_window(config: object) -> int | None:
    """The window of a model that attends through one (Mistral v0.1: 4096), else None."""
    window = getattr(config, "sliding_window", None)
    return window if window is not None and getattr(config, "use_sliding_window", True) else None


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
