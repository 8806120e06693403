"""Pair selection for each training objective, and the SafeDPO transform T(D).

All functions are pure and vectorised: they take the normalized pairs table (DESIGN.md schema:
`response_0/1`, `unsafe_0/1`, `better_id`, `safer_id`) and return a table of (chosen, rejected)
pairs with the safety flags of each side. They never invent a pair and never lose one without
counting it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from pipeline.config import OBJECTIVES

#: Columns of a selected-pairs table. `chosen_idx` is the index (0/1) of the chosen response in
#: the original pair, so per-response artifacts (reference log-probs) can be joined on
#: (`pair_id`, response index) rather than on row order.
SELECTED_COLUMNS = [
    "pair_id", "prompt_id", "prompt", "chosen", "rejected",
    "chosen_idx", "h_chosen", "h_rejected", "action",
]


@dataclass(frozen=True)
class SelectionCounts:
    """How the input pairs were used. `kept + swapped + dropped == n_in` always holds."""

    n_in: int
    kept: int
    swapped: int
    dropped: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def transform_actions(unsafe_w: np.ndarray, unsafe_l: np.ndarray) -> np.ndarray:
    """T(D) on winner/loser safety flags (h = 1 unsafe): 'keep', 'swap' or 'drop' per pair.

    keep if the winner is safe; swap if the winner is unsafe and the loser safe; drop if both
    are unsafe (Sec. 4.1 of the paper).
    """
    unsafe_w = np.asarray(unsafe_w, dtype=bool)
    unsafe_l = np.asarray(unsafe_l, dtype=bool)
    return np.where(~unsafe_w, "keep", np.where(~unsafe_l, "swap", "drop"))


def _oriented(pairs: pd.DataFrame, winner_idx: np.ndarray) -> pd.DataFrame:
    """Orient each pair as (winner, loser) given the index of its winner."""
    w0 = winner_idx == 0
    r0 = pairs["response_0"].to_numpy()
    r1 = pairs["response_1"].to_numpy()
    u0 = pairs["unsafe_0"].to_numpy(dtype=bool)
    u1 = pairs["unsafe_1"].to_numpy(dtype=bool)
    return pd.DataFrame({
        "pair_id": pairs["pair_id"].to_numpy(),
        "prompt_id": pairs["prompt_id"].to_numpy(),
        "prompt": pairs["prompt"].to_numpy(),
        "chosen": np.where(w0, r0, r1),
        "rejected": np.where(w0, r1, r0),
        "chosen_idx": winner_idx.astype(np.int8),
        "h_chosen": np.where(w0, u0, u1),
        "h_rejected": np.where(w0, u1, u0),
    })


def _swap(df: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    out = df.copy()
    for a, b in (("chosen", "rejected"), ("h_chosen", "h_rejected")):
        out.loc[mask, [a, b]] = df.loc[mask, [b, a]].to_numpy()
    out.loc[mask, "chosen_idx"] = (1 - df.loc[mask, "chosen_idx"]).astype(np.int8)
    return out


def select_pairs(pairs: pd.DataFrame, objective: str) -> tuple[pd.DataFrame, SelectionCounts]:
    """Training pairs for `objective` (DESIGN.md, "Pair selection").

    - safedpo:        `better` pairs through T(D)
    - dpo_helpful:    `better` pairs, unchanged
    - dpo_harmless:   `safer` pairs, unchanged
    - dpo_safebetter: `better` pairs whose winner is safe; the rest dropped
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    n = len(pairs)
    winner = pairs["safer_id" if objective == "dpo_harmless" else "better_id"]
    df = _oriented(pairs, winner.to_numpy(dtype=np.int64))
    if objective == "safedpo":
        action = transform_actions(df["h_chosen"].to_numpy(), df["h_rejected"].to_numpy())
        df = _swap(df, action == "swap")
    elif objective == "dpo_safebetter":
        action = np.where(df["h_chosen"].to_numpy(dtype=bool), "drop", "keep")
    else:
        action = np.full(n, "keep")
    df["action"] = action
    counts = SelectionCounts(
        n_in=n,
        kept=int((action == "keep").sum()),
        swapped=int((action == "swap").sum()),
        dropped=int((action == "drop").sum()),
    )
    out = df.loc[action != "drop", SELECTED_COLUMNS].reset_index(drop=True)
    out["h_chosen"] = out["h_chosen"].astype(bool)
    out["h_rejected"] = out["h_rejected"].astype(bool)
    out["chosen_idx"] = out["chosen_idx"].astype(np.int8)
    return out, counts


def pair_type_counts(pairs: pd.DataFrame) -> dict[str, int]:
    """Counts of (winner, loser) safety types of the `better` pairs and what T(D) does to them."""
    b = pairs["better_id"].to_numpy(dtype=np.int64)
    u0 = pairs["unsafe_0"].to_numpy(dtype=bool)
    u1 = pairs["unsafe_1"].to_numpy(dtype=bool)
    uw = np.where(b == 0, u0, u1)
    ul = np.where(b == 0, u1, u0)
    action = transform_actions(uw, ul)
    return {
        "safe_safe": int((~uw & ~ul).sum()),
        "safe_unsafe": int((~uw & ul).sum()),
        "unsafe_safe": int((uw & ~ul).sum()),
        "unsafe_unsafe": int((uw & ul).sum()),
        "tdd_keep": int((action == "keep").sum()),
        "tdd_swap": int((action == "swap").sum()),
        "tdd_drop": int((action == "drop").sum()),
    }
