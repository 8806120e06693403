"""Batches as the model runs them, built on the host: right-padded rows (`collate`) or packed
rows without padding (`pack`), optionally with each prompt once for all its responses
(`shared_prompt_mask`), and where in them the log-probs are scored. `logps.forward_layout`
chooses among them; `logps.batch_logps` runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.encoding import IGNORE, Encoded

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


#: Batch keys of a packed batch whose sequences share prompts (`pack(share_prompts=True)`): per
#: token, the unit (a prompt and the responses that follow it) and the branch (0: the prompt,
#: j: the j-th response) it belongs to, from which `shared_prompt_mask` is built on the device.
UNITS = "unit_ids"
BRANCHES = "branch_ids"


@dataclass(frozen=True)
class PackPlan:
    """Where `pack` puts a batch: its units (prompt length, member sequences), their sizes in
    tokens, the row width and (row, offset) of each unit, the number of rows."""

    shared: bool  # prompts shared (`pack(share_prompts=True)`)
    units: list[tuple[int, list[int]]]
    sizes: list[int]
    width: int
    where: list[tuple[int, int]]
    rows: int

    def cost(self, attn_cost: float) -> float:
        return row_cost(self.rows, self.width, attn_cost)


def plan_pack(batch: Sequence[Encoded], share_prompts: bool, attn_cost: float) -> PackPlan:
    """`pack`'s units and rows for `batch`, without building the tensors."""
    # A unit: the shared prefix (k tokens of its first member) and its members.
    units: list[tuple[int, list[int]]] = []
    open_units: dict[tuple[int, ...], int] = {}  # prompt -> its unit with room for a response
    for i, e in enumerate(batch):
        # The prompt: the ids before the first label (0 when prompts are not shared).
        k = e.n_prompt_tokens if share_prompts else 0
        key = tuple(e.input_ids[:k])
        if k and key in open_units:
            units[open_units.pop(key)][1].append(i)
        elif k:
            open_units[key] = len(units)
            units.append((k, [i]))
        else:
            units.append((len(e.input_ids), [i]))
    sizes = [k + sum(len(batch[i].input_ids) - k for i in members) for k, members in units]
    widths = sorted({int(max(sizes) * f) for f in (1, 1.5, 2, 3)})
    fits = {w: fit_rows(sizes, w) for w in widths}
    width = min(widths, key=lambda w: row_cost(fits[w][1], w, attn_cost))
    where, rows = fits[width]
    return PackPlan(share_prompts, units, sizes, width, where, rows)


def pack(batch: Sequence[Encoded], pad_id: int, share_prompts: bool = False,
         attn_cost: float = 0.0) -> dict[str, torch.Tensor]:
    """Padding-free layout: the sequences laid end to end in rows (first-fit decreasing), each
    with its own `position_ids` from 0 and no `attention_mask`, from which transformers builds a
    block-causal mask, so no token attends across a boundary. Only the ends of rows hold
    padding (position 0 each: a segment of its own, and no position beyond a sequence's): a
    batch of 64 toy sequences drops from ~45% padding to ~9%, in one forward pass.

    With `share_prompts`, sequences with the same non-empty prompt (the ids before the first
    label) form units of a prompt and at most two responses (both sides of a pair; pairs of
    responses to one prompt in SFT), the prompt once and then each response at the positions
    it has in its own sequence; `UNITS` and `BRANCHES` say which tokens each may attend to
    (`shared_prompt_mask`). Causal attention makes the prompt's hidden states the same in every
    sequence, so the log-probs are those of the sequences run alone, and the prompt is computed
    once for two responses. Two, not more: the prompt positions' gradients then sum two terms,
    exactly, where more would be summed in an order a GPU's atomics leave open.

    Row width: 1, 1.5, 2 or 3 times the widest unit, whichever `row_cost` finds cheapest with
    `attn_cost` (`attention_cost` of the model; 0 takes the narrowest of the fewest tokens).
    Returns input_ids and position_ids (rows, width), the scored positions under `SCORED`,
    `SCORED_LABELS`, `SCORED_INTO`, `SEQ_TOKENS`, and with `share_prompts` `UNITS` and
    `BRANCHES`; `batch_logps` returns in `batch` order.
    """
    return packed(batch, pad_id, plan_pack(batch, share_prompts, attn_cost))


def packed(batch: Sequence[Encoded], pad_id: int, plan: PackPlan) -> dict[str, torch.Tensor]:
    """`batch` packed as `plan` (`plan_pack` of the same batch) says."""
    units, sizes, width, where, rows = plan.units, plan.sizes, plan.width, plan.where, plan.rows
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    positions = np.zeros((rows, width), dtype=np.int64)
    unit_ids = np.full((rows, width), -1, dtype=np.int64)
    branch_ids = np.zeros((rows, width), dtype=np.int64)
    src: list[np.ndarray] = [np.empty(0, np.int64)] * len(batch)
    labels, into, n_tok = list(src), list(src), [0] * len(batch)
    for u, ((k, members), (row, off)) in enumerate(zip(units, where, strict=True)):
        first = batch[members[0]].input_ids
        ids[row, off:off + k] = first[:k]
        positions[row, off:off + k] = np.arange(k)
        unit_ids[row, off:off + sizes[u]] = u
        tail = off + k  # where the next member's own tokens go
        for j, i in enumerate(members, start=1):
            e = batch[i]
            n = len(e.input_ids)
            ids[row, tail:tail + n - k] = e.input_ids[k:]
            positions[row, tail:tail + n - k] = np.arange(k, n)
            branch_ids[row, tail:tail + n - k] = j
            # Position t predicts token t + 1: the prompt's positions are shared, the rest its own.
            nxt = np.asarray(e.labels[1:], dtype=np.int64)
            t = np.flatnonzero(nxt != IGNORE)
            src[i] = row * width + np.where(t < k, off + t, tail + t - k)
            into[i] = i * width + t
            labels[i] = nxt[t]
            n_tok[i] = len(t)
            tail += n - k
    out = {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions),
           SCORED: torch.from_numpy(np.concatenate(src)),
           SCORED_LABELS: torch.from_numpy(np.concatenate(labels)),
           SCORED_INTO: torch.from_numpy(np.concatenate(into)),
           SEQ_TOKENS: torch.tensor(n_tok, dtype=torch.long)}
    if plan.shared:
        out[UNITS] = torch.from_numpy(unit_ids)
        out[BRANCHES] = torch.from_numpy(branch_ids)
    return out


def fit_rows(sizes: Sequence[int], width: int) -> tuple[list[tuple[int, int]], int]:
    """First-fit decreasing: (row, offset) of each item of `sizes` in rows of `width`, and the
    number of rows."""
    free: list[int] = []  # room left in each row
    where = [(0, 0)] * len(sizes)
    for u in sorted(range(len(sizes)), key=lambda u: -sizes[u]):
        row = next((r for r, room in enumerate(free) if room >= sizes[u]), len(free))
        if row == len(free):
            free.append(width)
        where[u] = (row, width - free[row])
        free[row] -= sizes[u]
    return where, len(free)


def row_cost(rows: int, width: int, attn_cost: float) -> float:
    """Relative cost of a forward over rows × width tokens: the linear layers grow with the
    tokens, attention (masked, so computed over whole rows) with rows × width²; `attn_cost` is
    the ratio of one query-key pair's FLOPs to one token's (`attention_cost`)."""
    return rows * width * (1.0 + attn_cost * width)


def layout_of(batch: dict[str, torch.Tensor]) -> str:
    """Which layout a collated batch is in: padded, packed or shared_prompts."""
    return "shared_prompts" if UNITS in batch else "packed" if "position_ids" in batch \
        else "padded"


#: What one more forward pass costs, in the tokens of `row_cost`: fixed costs per pass and the
#: lower efficiency of the smaller matrix products of a length group. Fitted on a 2-core CPU by
#: bench/layout_costs.py: ~230 tokens for the tiny default, ~50 at 30M parameters.
PASS_COST = 128.0


def length_groups(lengths: Sequence[int], groups: int) -> list[np.ndarray]:
    """The sorted `lengths` in the length groups of a padded batch run as `groups` forward
    passes, as `logps.batch_logps` splits it; each pass is as wide as its longest."""
    return np.array_split(np.sort(np.asarray(lengths)), max(1, min(groups, len(lengths))))


def padded_cost(lengths: Sequence[int], groups: int, attn_cost: float,
                pass_cost: float = PASS_COST) -> float:
    """Cost of a padded batch of sequences of `lengths` run as `groups` length groups
    (`length_groups`): `row_cost` plus `pass_cost` per forward pass."""
    return sum(row_cost(len(p), int(p.max()), attn_cost) + pass_cost
               for p in length_groups(lengths, groups))


def cheapest(batch: Sequence[Encoded], pad_id: int, groups: int, attn_cost: float,
             share_prompts: bool = True, pass_cost: float = PASS_COST
             ) -> dict[str, torch.Tensor]:
    """`batch` in whichever layout costs least: padded (run in `groups` forward passes),
    packed, or packed with shared prompts (if `share_prompts`), by `row_cost` plus
    `pass_cost` per forward pass. Short sequences favour the packed layouts (no padding, each
    prompt once, one pass); long ones on a small model favour padding, since attention over a
    packed row is paid over its whole width (bench/layout_costs.py)."""
    plans = [plan_pack(batch, share, attn_cost) for share in (False, True)[:1 + share_prompts]]
    best = min(plans, key=lambda plan: plan.cost(attn_cost))
    padded = padded_cost([len(e.input_ids) for e in batch], groups, attn_cost, pass_cost)
    if padded <= best.cost(attn_cost) + pass_cost:
        return collate(batch, pad_id)
    return packed(batch, pad_id, best)


def shared_prompt_mask(units: torch.Tensor, branches: torch.Tensor, attn_implementation: str,
                       dtype: torch.dtype) -> torch.Tensor:
    """The (rows, 1, W, W) attention mask of a `pack(share_prompts=True)` batch, as transformers
    takes a ready 4D mask: a token sees the earlier tokens of its unit's prompt and of its own
    branch. Boolean (True: attend) for sdpa, additive (0 / dtype min) for eager."""
    width = units.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=units.device).tril()
    same = units[:, :, None] == units[:, None, :]
    seen = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    mask = (same & seen & causal)[:, None]
    if attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a log-prob is scored: (flat positions (N,) into the B·T hidden states, their
    labels (N,), tokens per sequence (B,)), from labels (B, T) with -100 where nothing is
    scored. Position t predicts token t+1, hence the shift, as in `sequence_logps`."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = shifted != IGNORE
    pos = mask.view(-1).nonzero().squeeze(1)
    return pos, shifted.view(-1)[pos], mask.sum(-1)


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
