"""Preference losses as pure functions of four log-prob tensors.

Notation follows the paper (arXiv 2505.20065): π is the policy, π_ref the reference, β the KL
coefficient, h ∈ {0, 1} the safety flag (1 = unsafe), Δ >= 0 the safety margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss with an optional per-pair margin subtracted inside the sigmoid.

        L = -log σ( β·[log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)] − margin )

    Shapes: all log-prob tensors are (B,) summed sequence log-probs; `margin` is (B,) or None.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are the
    implicit rewards β·log π/π_ref, detached.
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratio - rejected_logratio)
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def safedpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    h_chosen: torch.Tensor,
    h_rejected: torch.Tensor,
    beta: float,
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SafeDPO loss on T(D)-transformed pairs (paper Sec. 4, the SafeDPO objective with margin):

        L = -log σ( β·[log π(ỹ_w|x)/π_ref(ỹ_w|x) − log π(ỹ_l|x)/π_ref(ỹ_l|x)]
                    − (h̃_l − h̃_w)·Δ )

    The margin is non-zero only on safe-vs-unsafe pairs: there it asks the policy to prefer the
    safe response by more than Δ/β nats of log-ratio. It leaves the optimum unchanged
    (Prop. 4.4) and speeds the move away from unsafe responses. With Δ = 0 this is plain DPO on
    the transformed pairs.

    Shapes: log-prob tensors (B,); `h_chosen`, `h_rejected` (B,) bool or {0,1}.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).
    """
    margin = (h_rejected.to(policy_chosen_logps.dtype) - h_chosen.to(policy_chosen_logps.dtype))
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta, margin * delta)
