"""ALGORITHMS.md §1 oracles for the DPO family, in float64."""

import math

import pytest
import torch

from trainers.losses import (
    bt_loss,
    dpo_loss,
    get_loss,
    ipo_loss,
    loo_advantages,
    policy_gradient_loss,
    wrpo_alpha,
    wrpo_loss,
)

D = torch.float64


def _logps(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    return [(-40 * torch.rand(n, generator=g, dtype=D) - 1) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_dpo_is_log2_when_policy_equals_reference(beta):
    pc, pr, _, _ = _logps()
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta)
    assert losses.dtype == D
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-15)
    assert torch.all(cr == 0) and torch.all(rr == 0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_gradient_wrt_chosen_logp(beta):
    pc, pr, rc, rrf = _logps(1)
    pc = pc.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rrf, beta)
    losses.sum().backward()
    z = beta * ((pc.detach() - rc) - (pr - rrf))
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-z), rtol=0, atol=1e-14)


def test_dpo_swap_gives_minus_logsigmoid_minus_z():
    beta = 0.3
    pc, pr, rc, rrf = _logps(2)
    z = beta * ((pc - rc) - (pr - rrf))
    swapped, _, _ = dpo_loss(pr, pc, rrf, rc, beta)
    torch.testing.assert_close(swapped, -torch.nn.functional.logsigmoid(-z), rtol=0, atol=1e-14)
    straight, _, _ = dpo_loss(pc, pr, rc, rrf, beta)
    torch.testing.assert_close(straight, -torch.nn.functional.logsigmoid(z), rtol=0, atol=1e-14)


def test_dpo_rewards_and_a_worked_value():
    # beta 0.1: chosen ratio -50 - (-52) = 2, rejected ratio -45 - (-44) = -1 -> z = 0.3
    losses, cr, rr = dpo_loss(torch.tensor([-50.0], dtype=D), torch.tensor([-45.0], dtype=D),
                              torch.tensor([-52.0], dtype=D), torch.tensor([-44.0], dtype=D), 0.1)
    assert cr.item() == pytest.approx(0.2, abs=1e-15)
    assert rr.item() == pytest.approx(-0.1, abs=1e-15)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-15)


def test_ipo_value_and_minimum():
    beta = 0.25  # target margin 1/(2β) = 2
    pc = torch.tensor([-10.0, -10.0], dtype=D)
    pr = torch.tensor([-12.0, -10.0], dtype=D)
    ref = torch.tensor([-10.0, -10.0], dtype=D)
    losses, _, _ = ipo_loss(pc, pr, ref, ref, beta)
    # margin 2 hits the target exactly; margin 0 is 2 short -> (0 - 2)^2 = 4
    torch.testing.assert_close(losses, torch.tensor([0.0, 4.0], dtype=D), rtol=0, atol=1e-15)


def test_registry_and_bad_beta():
    assert get_loss("dpo") is dpo_loss and get_loss("ipo") is ipo_loss
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        get_loss("kto")
    x = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0)


def _six(seed=3, n=5):
    g = torch.Generator().manual_seed(seed)
    return [(-40 * torch.rand(n, generator=g, dtype=D) - 1) for _ in range(6)]


def test_wrpo_alpha_zero_and_one_are_dpo_on_the_matching_pair():

    ws, wt, l, rws, rwt, rl = _six()
    zero, _, _ = wrpo_loss(ws, wt, l, rws, rwt, rl, 0.1, 0.0)
    one, _, _ = wrpo_loss(ws, wt, l, rws, rwt, rl, 0.1, 1.0)
    torch.testing.assert_close(zero, dpo_loss(wt, l, rwt, rl, 0.1)[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(one, dpo_loss(ws, l, rws, rl, 0.1)[0], rtol=0, atol=1e-15)


def test_wrpo_same_chosen_is_alpha_free_and_log2_at_the_reference():

    ws, _, l, rws, _, rl = _six(4)
    a = wrpo_loss(ws, ws, l, rws, rws, rl, 0.2, 0.1)[0]
    b = wrpo_loss(ws, ws, l, rws, rws, rl, 0.2, 0.9)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    at_ref = wrpo_loss(ws, ws, l, ws.clone(), ws.clone(), l.clone(), 0.2, 0.5)[0]
    torch.testing.assert_close(at_ref, torch.full_like(at_ref, math.log(2)), rtol=0, atol=1e-15)


def test_wrpo_worked_value_and_schedule():

    t = lambda v: torch.tensor([v], dtype=D)  # noqa: E731
    loss, _, _ = wrpo_loss(t(-50), t(-40), t(-45), t(-52), t(-41), t(-44), 0.1, 0.5)
    assert abs(float(loss) - 0.575939) < 1e-6
    assert [wrpo_alpha(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.05, 0.1, 0.1]
    assert wrpo_alpha(3, 4, alpha_max=1.0) == 0.75
    with pytest.raises(ValueError):
        wrpo_alpha(1, 0)


def test_leave_one_out_advantages_and_the_policy_gradient_loss():

    r = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    a = loo_advantages(r)
    torch.testing.assert_close(a, torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(a.sum(1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=">= 2 samples"):
        loo_advantages(r[:, :1])
    logps = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -5.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-3.0, -2.5, -3.0], [-1.0, -5.0, -2.0]], dtype=torch.float64)
    loss = policy_gradient_loss(logps, r, ref, kl_coef=0.5)
    penalised = r - 0.5 * (logps.detach() - ref)
    expect = loo_advantages(penalised)
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    torch.testing.assert_close(grad, -expect, rtol=0, atol=1e-12)  # ∂/∂logπ of −A·logπ with A detached
    # π = π_ref and equal rewards: no signal
    flat = policy_gradient_loss(ref.clone().requires_grad_(), torch.ones(2, 3, dtype=torch.float64), ref, 0.5)
    assert float(flat.abs().max()) == 0.0


def test_bt_loss_oracles():
    s = torch.tensor([0.3, -1.2, 4.0], dtype=torch.float64)
    torch.testing.assert_close(bt_loss(s, s.clone()), torch.full((3,), math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)
    w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    loss = bt_loss(w, torch.tensor([0.5], dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-15)
    loss.sum().backward()
    assert w.grad.item() == pytest.approx(-1 / (1 + math.exp(1.5)), abs=1e-15)  # -σ(-(s_w - s_l))


def test_conditioned_loss_weighs_each_objectives_dpo_in_its_own_ordering():
    """§9: at π = π_ref L_row = log 2 · Σ_k λ_k |m_k| (m_k = 0: no label, no loss); otherwise objective
    k's term is DPO with chosen and rejected swapped where m_k = -1, weighted by λ_k."""
    from trainers.losses import conditioned_loss, dpo_loss

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    signs = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    lam = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64)
    same = t(-5.0, -7.0)
    losses, _, _ = conditioned_loss(same, same, same, same, signs, lam, 0.1)
    torch.testing.assert_close(losses, math.log(2) * t(0.7, 0.9), rtol=0, atol=1e-15)
    pc, pr, rc, rr = t(-50.0, -3.0), t(-40.0, -4.0), t(-52.0, -3.5), t(-41.0, -3.0)
    losses, _, _ = conditioned_loss(pc, pr, rc, rr, signs, lam, 0.1)
    fwd, back = dpo_loss(pc, pr, rc, rr, 0.1)[0], dpo_loss(pr, pc, rr, rc, 0.1)[0]
    torch.testing.assert_close(losses, t(0.2 * fwd[0] + 0.5 * back[0], 0.6 * fwd[1] + 0.3 * fwd[1]), rtol=0, atol=1e-15)
