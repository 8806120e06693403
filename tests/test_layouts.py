"""Batches as the model runs them: padded rows, packed rows, shared prompts, by hand."""

from __future__ import annotations

import torch

from pipeline.encoding import Encoded
from pipeline.layouts import (
    BRANCHES,
    SCORED,
    SCORED_INTO,
    SCORED_LABELS,
    SEQ_TOKENS,
    UNITS,
    cheapest,
    fit_rows,
    pack,
    padded_cost,
    plan_pack,
    row_cost,
    shared_prompt_mask,
)


def test_pack_by_hand() -> None:
    """First-fit decreasing into rows as wide as the longest sequence; positions restart at
    each sequence; scored positions map packed rows back to a (sequences, width) grid."""
    a = Encoded(input_ids=[1, 5, 6, 7, 8], labels=[-100, -100, 6, 7, 8])
    b = Encoded(input_ids=[1, 9], labels=[-100, 9])
    c = Encoded(input_ids=[1, 4, 3], labels=[-100, -100, 3])
    got = pack([a, b, c], pad_id=0, attn_cost=1.0)  # costly attention: the narrowest rows
    # a fills row 0; c (longer than b) goes first into row 1, b after it.
    assert got["input_ids"].tolist() == [[1, 5, 6, 7, 8], [1, 4, 3, 1, 9]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert got[SCORED].tolist() == [1, 2, 3, 8, 6]
    assert got[SCORED_LABELS].tolist() == [6, 7, 8, 9, 3]
    assert got[SCORED_INTO].tolist() == [1, 2, 3, 5, 11]
    assert got[SEQ_TOKENS].tolist() == [3, 1, 1]
    assert "attention_mask" not in got  # transformers masks packed rows only without one
    # Row padding: position 0 (a segment of its own, beyond no sequence's length), not scored.
    d = pack([a, c], pad_id=0, attn_cost=1.0)
    assert d["input_ids"].tolist() == [[1, 5, 6, 7, 8], [1, 4, 3, 0, 0]]
    assert d["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]


def test_pack_with_shared_prompts_by_hand() -> None:
    """Two responses of one prompt: the prompt once, each response at the positions it has in
    its own sequence; the last prompt position scores the first token of both responses."""
    a = Encoded(input_ids=[1, 5, 6, 7], labels=[-100, -100, 6, 7])
    b = Encoded(input_ids=[1, 5, 9], labels=[-100, -100, 9])
    c = Encoded(input_ids=[1, 4, 3], labels=[-100, -100, 3])  # another prompt
    assert [a.n_prompt_tokens, Encoded([1, 2], [-100, -100]).n_prompt_tokens] == [2, 2]
    got = pack([a, b, c], pad_id=0, share_prompts=True, attn_cost=1.0)
    # Units: [1 5 | 6 7 | 9] (5 tokens) and [1 4 | 3] (3 tokens), rows 5 wide.
    assert got["input_ids"].tolist() == [[1, 5, 6, 7, 9], [1, 4, 3, 0, 0]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    assert got[UNITS].tolist() == [[0, 0, 0, 0, 0], [1, 1, 1, -1, -1]]
    assert got[BRANCHES].tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 0, 0]]
    assert got[SCORED].tolist() == [1, 2, 1, 6]
    assert got[SCORED_LABELS].tolist() == [6, 7, 9, 3]
    assert got[SCORED_INTO].tolist() == [1, 2, 6, 11]
    assert got[SEQ_TOKENS].tolist() == [2, 1, 1]
    mask = shared_prompt_mask(got[UNITS], got[BRANCHES], "sdpa", torch.float32)
    # Row 0: the second response (column 4) sees the prompt and itself, not the first one.
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert mask[1, 0, 3].int().tolist() == [0, 0, 0, 1, 0]  # row padding: itself only
    additive = shared_prompt_mask(got[UNITS], got[BRANCHES], "eager", torch.float32)
    assert torch.equal(additive == 0, mask)


def test_packed_row_width_by_cost() -> None:
    """Wider rows waste less at their ends but attend over more: `pack` takes the width of the
    least `row_cost` among 1, 1.5, 2 and 3 times the widest unit."""
    sizes = [10, 7, 7, 5]
    assert fit_rows(sizes, 10) == ([(0, 0), (1, 0), (2, 0), (3, 0)], 4)
    assert fit_rows(sizes, 15) == ([(0, 0), (1, 0), (1, 7), (0, 10)], 2)
    assert row_cost(4, 10, 0.0) == 40 and row_cost(2, 15, 0.0) == 30
    assert row_cost(4, 10, 0.5) == 240 < row_cost(2, 15, 0.5) == 255
    seqs = [Encoded([1] * n, [-100] + [1] * (n - 1)) for n in sizes]
    assert pack(seqs, 0, attn_cost=0.5)["input_ids"].shape == (4, 10)
    # Free attention: the fewest tokens, and of 15 and 30 wide (both 30 tokens) the narrower.
    assert pack(seqs, 0, attn_cost=0.0)["input_ids"].shape == (2, 15)


def test_shared_prompts_pair_responses_two_at_a_time() -> None:
    """Three responses of one prompt: the prompt once for the first two, again for the third
    (the prompt's gradient then sums two terms, exactly, on any device); a sequence without a
    prompt shares nothing."""
    seqs = [Encoded([1, 5, 10 + r], [-100, -100, 10 + r]) for r in range(3)]
    seqs.append(Encoded([7, 8], [7, 8]))  # no prompt: scored from its first token on
    got = pack(seqs, pad_id=0, share_prompts=True, attn_cost=1.0)
    units = [sorted(set(row) - {-1}) for row in got[UNITS].tolist()]
    assert sorted(u for row in units for u in row) == [0, 1, 2]
    ids = got["input_ids"].tolist()
    assert [1, 5, 10, 11] in [row[:4] for row in ids]
    assert sum(row.count(5) for row in ids) == 2  # the prompt twice, not three times
    assert got[SEQ_TOKENS].tolist() == [1, 1, 1, 1]


def test_cheapest_layout_by_hand() -> None:
    """`auto` takes, per batch, the layout of the least `row_cost` plus a cost per forward
    pass: two pairs with long prompts and short responses share their prompts; long responses
    to short prompts, where attention over a two-response row costs more than the padding it
    saves, stay padded; with a dearer forward pass, one packed pass beats two padded ones."""
    def pairs(prompt: int, responses: list[int]) -> list[Encoded]:
        out = []
        for q, n in enumerate(responses):
            p = [1 + q // 2] * prompt  # pairs 0-1 and 2-3 share a prompt
            out.append(Encoded(p + [9] * n, [-100] * prompt + [9] * n))
        return out

    short = pairs(8, [2, 3, 2, 2])  # lengths 10, 11, 10, 10; units of 13 and 12 tokens
    assert padded_cost([10, 11, 10, 10], 2, 0.05, pass_cost=1.0) == \
        row_cost(2, 10, 0.05) + row_cost(2, 11, 0.05) + 2.0 == 66.1
    shared = plan_pack(short, True, 0.05)
    assert (shared.rows, shared.width) == (2, 13) and shared.cost(0.05) == row_cost(2, 13, 0.05)
    assert UNITS in cheapest(short, 0, groups=2, attn_cost=0.05, pass_cost=1.0)
    # Not allowed to share: packed rows (4 x 11, 68.2) cost more than 2 padded groups (64.1)...
    assert "attention_mask" in cheapest(short, 0, 2, 0.05, share_prompts=False, pass_cost=1.0)
    # ... unless a forward pass costs more than the 4.1 they save.
    got = cheapest(short, 0, 2, 0.05, share_prompts=False, pass_cost=5.0)
    assert "position_ids" in got and UNITS not in got
    long = pairs(1, [20, 21, 20, 21])  # units of 42 tokens against sequences of 21-22
    got = cheapest(long, 0, groups=2, attn_cost=0.05, pass_cost=1.0)
    assert "attention_mask" in got and got["input_ids"].shape == (4, 22)
    # Free attention: the fewest tokens win, shared prompts included.
    assert UNITS in cheapest(long, 0, groups=2, attn_cost=0.0, pass_cost=1.0)
