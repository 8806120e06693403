"""Training objectives, each declared once: which label orients its pairs, what it does to each
oriented pair, its loss, whether Δ applies, its display name and the params it reads.

Pair selection (`select_pairs`), the training loss (`preference.PreferenceLoss`), the tabular
theory check and the method comparison all look an objective up here; adding one (IPO, another
margin) is one entry in `OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from pipeline.errors import UserError
from pipeline.losses import dpo_loss, safedpo_loss
from pipeline.selection import (
    SELECTED_COLUMNS,
    SelectionCounts,
    contradictions,
    oriented,
    swapped,
    transform_actions,
)

Actions = Callable[[np.ndarray, np.ndarray], np.ndarray]
LossTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def keep_all(h_w: np.ndarray, h_l: np.ndarray) -> np.ndarray:
    return np.full(len(h_w), "keep")


def keep_safe_winner(h_w: np.ndarray, h_l: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(h_w, dtype=bool), "drop", "keep")


@dataclass(frozen=True)
class Objective:
    """One training objective.

    winner: the label that orients a pair (`better` = helpfulness, `safer` = harmlessness).
    actions: (h_winner, h_loser) -> 'keep' | 'swap' | 'drop' per oriented pair.
    uses_delta: the SafeDPO margin Δ enters the loss (Eq. 12); else plain DPO (Eq. 7).
    """

    name: str
    display: str
    winner: Literal["better", "safer"]
    actions: Actions
    uses_delta: bool
    description: str

    @property
    def params(self) -> tuple[str, ...]:
        """The top-level params its loss reads."""
        return ("beta", "delta") if self.uses_delta else ("beta",)

    @property
    def reads_safer(self) -> bool:
        return self.winner == "safer"

    def label(self, delta: float) -> str:
        """Display name of a run: Δ is part of it only where Δ is used."""
        return f"{self.display} (Δ={delta:g})" if self.uses_delta else self.display

    def loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, h_chosen: torch.Tensor,
             h_rejected: torch.Tensor, beta: float, delta: float) -> LossTensors:
        """Per-pair losses and implicit rewards (B,) each; see `pipeline.losses`."""
        if self.uses_delta:
            return safedpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                h_chosen, h_rejected, beta, delta)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("safedpo", "SafeDPO", "better", transform_actions, True,
              "helpfulness pairs through T(D): keep if the winner is safe, swap if only the "
              "loser is safe, drop if both are unsafe; margin Δ on safe-vs-unsafe pairs"),
    Objective("dpo_helpful", "DPO (helpful)", "better", keep_all, False,
              "helpfulness pairs as labelled"),
    Objective("dpo_harmless", "DPO (harmless)", "safer", keep_all, False,
              "harmlessness pairs as labelled; pairs whose safety labels contradict are left out"),
    Objective("dpo_safebetter", "DPO (safe-better)", "better", keep_safe_winner, False,
              "helpfulness pairs whose winner is safe"),
)}


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"parameter train.objective: {name!r} is not one of "
                        f"{sorted(OBJECTIVES)}") from None


def select_pairs(pairs: pd.DataFrame, objective: str | Objective
                 ) -> tuple[pd.DataFrame, SelectionCounts]:
    """Training pairs of `objective`: each pair oriented by its winner label, then kept, swapped
    or dropped by its rule. Never invents a pair; every pair lost is counted."""
    obj = get(objective) if isinstance(objective, str) else objective
    df = oriented(pairs, pairs[f"{obj.winner}_id"].to_numpy(dtype=np.int64))
    action = obj.actions(df["h_chosen"].to_numpy(dtype=bool), df["h_rejected"].to_numpy(dtype=bool))
    bad = contradictions(pairs) if obj.reads_safer else np.zeros(len(pairs), dtype=bool)
    action = np.where(bad, "drop", action)
    df = swapped(df, action == "swap")
    df["action"] = action
    counts = SelectionCounts(
        n_in=len(pairs), kept=int((action == "keep").sum()),
        swapped=int((action == "swap").sum()), dropped=int((action == "drop").sum()),
        contradictions=int(bad.sum()))
    out = df.loc[action != "drop", SELECTED_COLUMNS].reset_index(drop=True)
    out["h_chosen"] = out["h_chosen"].astype(bool)
    out["h_rejected"] = out["h_rejected"].astype(bool)
    out["chosen_idx"] = out["chosen_idx"].astype(np.int8)
    return out, counts
