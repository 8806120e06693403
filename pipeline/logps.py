"""Sequence log-probabilities: the one function shared by reference precomputation, training
and evaluation, plus padding collate, batched scoring and the reference fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.modeling import Encoded

IGNORE = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens of each sequence, and how many there are.

    logits: (B, T, V) from a causal LM; labels: (B, T) with -100 where nothing is scored.
    Position t predicts token t+1, hence the shift. Returns (logps (B,), n_tokens (B,)).
    The log-softmax runs in float32 so bf16 logits do not lose the sum's precision.
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1, :]
    mask = labels != IGNORE
    safe_labels = torch.where(mask, labels, 0)
    token_logps = torch.gather(
        logits.float().log_softmax(-1), 2, safe_labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


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


@torch.inference_mode()
def score_sequences(
    model: PreTrainedModel, encoded: Sequence[Encoded], pad_id: int, batch_size: int,
    device: torch.device | str = "cpu", desc: str = "log-probs",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of many sequences, in their input order.

    Batches are formed from length-sorted sequences, which cuts padding to a few percent.
    """
    model.eval()
    order = np.argsort([len(e.input_ids) for e in encoded], kind="stable")
    logps = np.zeros(len(encoded), dtype=np.float64)
    ntok = np.zeros(len(encoded), dtype=np.int64)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                      disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        lp, n = batch_logps(model, batch)
        logps[idx] = lp.double().cpu().numpy()
        ntok[idx] = n.cpu().numpy()
    return logps, ntok


@dataclass(frozen=True)
class Fingerprint:
    """What reference log-probs depend on. Training refuses ones that do not match."""

    model: str
    tokenizer: str
    template: str
    max_length: int
    data: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def mismatches(self, other: Fingerprint) -> list[str]:
        return [k for k, v in self.as_dict().items() if other.as_dict()[k] != v]


def tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]
