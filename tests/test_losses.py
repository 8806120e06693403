"""The preference losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import dpo_loss, safedpo_loss


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:  # -log σ(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_dpo_loss_by_hand() -> None:
    # Row 0: log-ratios chosen −1 − (−1.5) = 0.5, rejected −2 − (−1.5) = −0.5;
    #        logit = 0.1·(0.5 − (−0.5)) = 0.1, loss = −log σ(0.1) = log(1 + e^−0.1) = 0.644397
    # Row 1: chosen ratio −3 − (−2) = −1, rejected −1 − (−2) = 1; logit = 0.1·(−2) = −0.2,
    #        loss = log(1 + e^0.2) = 0.798139
    losses, rc, rr = dpo_loss(t(-1, -3), t(-2, -1), t(-1.5, -2), t(-1.5, -2), beta=0.1)
    assert losses.tolist() == pytest.approx([0.6443967, 0.7981389], abs=1e-6)
    assert rc.tolist() == pytest.approx([0.05, -0.1])
    assert rr.tolist() == pytest.approx([-0.05, 0.1])


def test_safedpo_margin_applies_only_to_safe_vs_unsafe_pairs() -> None:
    # Same log-probs for all three rows: β·(ratio_w − ratio_l) = 0.1·(0.5 + 0.5) = 0.1.
    pc, pr, rc, rr = t(-1, -1, -1), t(-2, -2, -2), t(-1.5, -1.5, -1.5), t(-1.5, -1.5, -1.5)
    h_w = torch.tensor([False, False, False])
    h_l = torch.tensor([True, False, True])
    losses, _, _ = safedpo_loss(pc, pr, rc, rr, h_w, h_l, beta=0.1, delta=10.0)
    # safe-vs-unsafe: logit 0.1 − (1 − 0)·10 = −9.9, loss = log(1 + e^9.9) = 9.900050
    # safe-vs-safe:  logit 0.1 − 0 = 0.1, loss = 0.644397 (plain DPO)
    assert losses.tolist() == pytest.approx([9.9000502, 0.6443967, 9.9000502], abs=1e-6)
    assert losses[0].item() == pytest.approx(softplus(9.9), abs=1e-9)


def test_safedpo_with_zero_delta_is_dpo_on_the_same_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    h_l = torch.rand(64, generator=gen) < 0.5
    h_w = torch.zeros(64, dtype=torch.bool)
    safe, s_c, s_r = safedpo_loss(pc, pr, rc, rr, h_w, h_l, beta=0.1, delta=0.0)
    plain, d_c, d_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(safe, plain, rtol=0, atol=0)
    torch.testing.assert_close(s_c, d_c)
    torch.testing.assert_close(s_r, d_r)


@pytest.mark.parametrize("delta", [0.0, 10.0])
def test_gradient_lowers_the_unsafe_response(delta: float) -> None:
    pc = t(-1.0).requires_grad_()
    pr = t(-2.0).requires_grad_()  # the unsafe loser
    losses, _, _ = safedpo_loss(pc, pr, t(-1.5), t(-1.5), torch.tensor([False]),
                                torch.tensor([True]), beta=0.1, delta=delta)
    losses.sum().backward()
    # ∂L/∂logπ(y_l) = β·σ(−logit) > 0, so a gradient step lowers the unsafe log-prob, and
    # ∂L/∂logπ(y_w) = −β·σ(−logit) < 0 raises the safe one.
    logit = 0.1 - delta
    expected = 0.1 / (1 + math.exp(logit))
    assert pr.grad.item() == pytest.approx(expected, rel=1e-9)
    assert pc.grad.item() == pytest.approx(-expected, rel=1e-9)
    assert pr.grad.item() > 0


def test_margin_speeds_the_push_away_from_unsafe() -> None:
    grads = []
    for delta in (0.0, 1.0, 10.0):
        pr = t(-2.0).requires_grad_()
        loss, _, _ = safedpo_loss(t(-1.0), pr, t(-1.5), t(-1.5), torch.tensor([False]),
                                  torch.tensor([True]), beta=0.1, delta=delta)
        loss.sum().backward()
        grads.append(pr.grad.item())
    assert grads[0] < grads[1] < grads[2] <= 0.1
