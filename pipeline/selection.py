"""The pairs table and its orientations: the one place that knows which side of a pair wins.

The normalized pairs table (docs/architecture.md) has `response_0/1`, `unsafe_0/1`,
`better_id`, `safer_id`. Here it is oriented as (chosen, rejected) with the safety flags of each
side, reshaped to one row per response, and put through the SafeDPO transform T(D). All
functions are pure and vectorised. Which orientation and rule each training objective uses is
declared in `pipeline.objectives`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

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

    #: Of `dropped`, pairs left out because their labels contradict (see `contradictions`).
    contradictions: int = 0

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


def oriented(pairs: pd.DataFrame, winner_idx: np.ndarray) -> pd.DataFrame:
    """Orient each pair as (chosen, rejected) = (winner, loser) given its winner's index."""
    winner_idx = np.asarray(winner_idx, dtype=np.int64)
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


def swapped(df: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """`df` (oriented pairs) with chosen and rejected exchanged where `mask` holds."""
    out = df.copy()
    for a, b in (("chosen", "rejected"), ("h_chosen", "h_rejected")):
        out.loc[mask, [a, b]] = df.loc[mask, [b, a]].to_numpy()
    out.loc[mask, "chosen_idx"] = (1 - df.loc[mask, "chosen_idx"]).astype(np.int8)
    return out


def contradictions(pairs: pd.DataFrame) -> np.ndarray:
    """Pairs whose `safer` response is labelled unsafe while the other is labelled safe: the
    two labels disagree, so only an objective that reads `safer_id` has to leave them out."""
    s1 = pairs["safer_id"].to_numpy(dtype=np.int64) == 1
    u0 = pairs["unsafe_0"].to_numpy(dtype=bool)
    u1 = pairs["unsafe_1"].to_numpy(dtype=bool)
    return np.where(s1, u1 & ~u0, u0 & ~u1)


def responses_long(pairs: pd.DataFrame) -> pd.DataFrame:
    """Every response of every pair as one row, keyed by (`pair_id`, `idx`) where the table has
    ids: all response_0 rows first, then all response_1 rows (so row k and row n + k are the
    two sides of pair k)."""
    keys = {k: pairs[k].to_numpy() for k in ("pair_id", "prompt_id") if k in pairs}
    parts = []
    for i in (0, 1):
        parts.append(pd.DataFrame({
            **keys, "prompt": pairs["prompt"].to_numpy(), "idx": np.full(len(pairs), i, np.int8),
            "response": pairs[f"response_{i}"].to_numpy(),
            "unsafe": pairs[f"unsafe_{i}"].to_numpy(dtype=bool)}))
    return pd.concat(parts, ignore_index=True)


def oriented_rows(winner_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each pair's winner and loser in `responses_long` order (row k and row n + k
    are pair k's response_0 and response_1), given its winner's index: what scores computed
    per response are oriented by, as `oriented` orients the texts."""
    w = np.asarray(winner_idx, dtype=np.int64)
    k = np.arange(len(w))
    return k + len(w) * w, k + len(w) * (1 - w)


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
