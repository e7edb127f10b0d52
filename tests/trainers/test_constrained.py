"""§4 MOPO oracles on a discrete bandit, in float64: the dual step's λ against a direct constrained
solve (scipy SLSQP), slack constraints, weighted behaviour cloning, infeasible thresholds."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from trainers.constrained import (
    best_achievable,
    check_feasible,
    check_multipliers,
    constraint_report,
    constraint_values,
    dual_step,
    joint_margins,
    mopo_ratios,
    solve_dual,
    win_rates,
)
from trainers.losses import weighted_bc_loss as mopo_policy_loss

D = torch.float64


def _bandit(n=8, seed=0):
    """One prompt, n candidates (the whole support of a uniform π_ref); a primary and a secondary
    objective that conflict (the secondary's scores are the primary's reversed plus noise)."""
    g = torch.Generator().manual_seed(seed)
    s_p = torch.randn(1, n, generator=g, dtype=D) * 2
    s_q = -s_p + 0.5 * torch.randn(1, n, generator=g, dtype=D)
    return win_rates(s_p), win_rates(s_q)[:, :, None]


def _dual(p_bar, q_bar, b, tau, steps=20000, eta=2.0):
    lam = torch.zeros(q_bar.shape[2], dtype=D)
    for _ in range(steps):
        rho = mopo_ratios(p_bar, q_bar, lam, tau)
        lam = dual_step(lam, b, constraint_values(rho, q_bar), eta)
    return lam, mopo_ratios(p_bar, q_bar, lam, tau)


def _slsqp(p, q, b, tau):
    """max_π Σ π p − τ Σ π log(π n) s.t. Σ π q ≥ b over the simplex (π_ref = 1/n)."""
    n = len(p)
    f = lambda x: -(x @ p - tau * np.sum(x * np.log(np.clip(x, 1e-300, None) * n)))  # noqa: E731
    grad = lambda x: -(p - tau * (np.log(np.clip(x, 1e-300, None) * n) + 1))  # noqa: E731
    res = minimize(f, np.full(n, 1 / n), jac=grad, method="SLSQP", bounds=[(1e-12, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1, "jac": lambda x: np.ones(n)},
                                {"type": "ineq", "fun": lambda x: x @ q - b, "jac": lambda x: q}],
                   options={"ftol": 1e-16, "maxiter": 1000})
    return res.x


def test_win_rates_from_scores_and_labels():
    w = win_rates(torch.tensor([[0.0, 0.0]], dtype=D))
    assert torch.equal(w, torch.tensor([[0.5, 0.5]], dtype=D))
    s = torch.tensor([[1.0, -1.0, 0.5]], dtype=D)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert abs(float(win_rates(s)[0, 0]) - (0.5 + sig(2.0) + sig(0.5)) / 3) < 1e-15
    labels = torch.tensor([[[9.0, 1.0], [0.0, 9.0]]], dtype=D)  # the diagonal is ignored
    assert torch.equal(win_rates(preferences=labels), torch.tensor([[0.75, 0.25]], dtype=D))
    with pytest.raises(ValueError, match="non-finite"):
        win_rates(torch.tensor([[float("nan"), 0.0]]))


def test_binding_constraint_matches_a_direct_constrained_solve():
    p_bar, q_bar = _bandit()
    tau = 0.1
    unconstrained = constraint_values(mopo_ratios(p_bar, q_bar, torch.zeros(1, dtype=D), tau), q_bar)
    b = torch.tensor([float(unconstrained) + 0.1], dtype=D)  # above what the primary alone gives: binds
    lam, rho = _dual(p_bar, q_bar, b, tau)
    pi_star = _slsqp(p_bar[0].numpy(), q_bar[0, :, 0].numpy(), float(b), tau)
    assert float(lam) > 0.1
    np.testing.assert_allclose(rho[0].numpy() / 8, pi_star, atol=1e-6)
    # λ* from the solver's π*: log π*_i − log π*_k = ((p̄_i − p̄_k) + λ (q̄_i − q̄_k)) / τ
    i, k = int(np.argmax(q_bar[0, :, 0])), int(np.argmin(q_bar[0, :, 0]))
    lam_star = (tau * np.log(pi_star[i] / pi_star[k]) - (p_bar[0, i] - p_bar[0, k]).item()) / (q_bar[0, i, 0] - q_bar[0, k, 0]).item()
    assert abs(float(lam) - lam_star) < 1e-4 * max(1.0, abs(lam_star))
    # the binding constraint holds with equality
    assert abs(float(constraint_values(rho, q_bar)) - float(b)) < 1e-8


def test_slack_constraint_keeps_lambda_zero_and_the_tilted_reference():
    p_bar, q_bar = _bandit(seed=1)
    tau = 0.2
    b = torch.tensor([float(q_bar.min())], dtype=D)  # always met
    lam, rho = _dual(p_bar, q_bar, b, tau, steps=200)
    assert float(lam) == 0.0
    tilted = torch.softmax(p_bar[0] / tau, 0)  # π_ref · exp(p̄/τ) / Z with π_ref uniform
    torch.testing.assert_close(rho[0] / 8, tilted, rtol=0, atol=1e-15)


def test_weighted_behaviour_cloning_converges_to_the_ratio():
    p_bar, q_bar = _bandit(seed=2)
    rho = mopo_ratios(p_bar, q_bar, torch.tensor([0.7], dtype=D), 0.3)
    theta = torch.zeros(1, 8, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=5.0)
    for _ in range(2000):
        loss = mopo_policy_loss(torch.log_softmax(theta, 1), rho).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(torch.softmax(theta, 1).detach(), rho / rho.mean(1, keepdim=True) / 8, rtol=0, atol=1e-8)


def test_rho_is_normalised_per_prompt():
    g = torch.Generator().manual_seed(3)
    p_bar, q_bar = torch.rand(4, 5, generator=g, dtype=D), torch.rand(4, 5, 2, generator=g, dtype=D)
    rho = mopo_ratios(p_bar, q_bar, torch.tensor([0.3, 2.0], dtype=D), 0.05)
    torch.testing.assert_close(rho.sum(1), torch.full((4,), 5.0, dtype=D), rtol=0, atol=1e-12)


def test_infeasible_thresholds_and_runaway_multipliers_are_named():
    p_bar, q_bar = _bandit()
    best = float(q_bar.max())
    check_feasible(q_bar, torch.tensor([best - 0.01], dtype=D), ["sentiment"])
    with pytest.raises(ValueError, match="sentiment: threshold"):
        check_feasible(q_bar, torch.tensor([best + 0.01], dtype=D), ["sentiment"])
    lam, _ = _dual(p_bar, q_bar, torch.tensor([best + 0.05], dtype=D), 0.1, steps=300)
    assert float(lam) > 10  # grows without bound
    with pytest.raises(RuntimeError, match="sentiment"):
        check_multipliers(lam, 10.0, ["sentiment"], torch.tensor([0.5]), torch.tensor([best + 0.05]))


def test_a_mask_is_the_same_as_dropping_the_absent_candidates():
    """A prompt with 3 of 5 candidates (padded, masked) gets the ρ, loss and constraint values it
    gets alone with its 3; the other prompt of the batch is untouched."""
    g = torch.Generator().manual_seed(4)
    p_bar, q_bar = torch.rand(2, 5, generator=g, dtype=D), torch.rand(2, 5, 2, generator=g, dtype=D)
    logps = -torch.rand(2, 5, generator=g, dtype=D) * 30
    lam = torch.tensor([0.4, 1.5], dtype=D)
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]])
    keep = torch.tensor([0, 2, 3])
    rho = mopo_ratios(p_bar, q_bar, lam, 0.2, mask)
    alone = mopo_ratios(p_bar[1:, keep], q_bar[1:, keep], lam, 0.2)
    torch.testing.assert_close(rho[1, keep], alone[0], rtol=0, atol=1e-15)
    assert rho[1, ~mask[1]].abs().max() == 0 and abs(float(rho[1].sum()) - 3) < 1e-12
    torch.testing.assert_close(rho[0], mopo_ratios(p_bar[:1], q_bar[:1], lam, 0.2)[0], rtol=0, atol=1e-15)
    loss = mopo_policy_loss(logps, rho, mask)
    torch.testing.assert_close(loss[1], mopo_policy_loss(logps[1:, keep], alone)[0], rtol=0, atol=1e-12)
    both = constraint_values(rho, q_bar, mask)
    sep = (constraint_values(rho[:1], q_bar[:1]) + constraint_values(alone, q_bar[1:, keep])) / 2
    torch.testing.assert_close(both, sep, rtol=0, atol=1e-15)
    q_nan = q_bar.clone()
    q_nan[1, ~mask[1]] = float("nan")
    expect = (q_bar[0].max(0).values + q_bar[1, keep].max(0).values) / 2
    torch.testing.assert_close(best_achievable(q_nan), expect, rtol=0, atol=1e-15)


def _opposed(B=6, n=5, seed=0):
    """Two secondary objectives in exact opposition on every prompt (q̄_2 = 1 − q̄_1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, n, generator=g, dtype=D) * 2
    q1 = win_rates(s)
    return torch.stack([q1, 1 - q1], -1)


def _maxmin_by_grid(q_bar, b):
    """t* = min_{μ∈Δ_2} mean_b max_i μᵀ(q̄_bi) − μᵀb (the LP's dual), on a fine grid of μ."""
    mu = torch.linspace(0, 1, 200001, dtype=D)
    M = torch.stack([mu, 1 - mu], 1)  # (G, 2)
    inner = torch.einsum("bnj,gj->gbn", q_bar, M).max(-1).values.mean(-1)
    return float((inner - M @ b).min())


def test_thresholds_each_reachable_alone_but_not_together_are_refused_with_the_joint_margins():

    q_bar = _opposed()
    best = best_achievable(q_bar)
    b = best - 0.05  # each alone: 0.05 to spare
    t, margins = joint_margins(q_bar, b)
    assert abs(t - _maxmin_by_grid(q_bar, b)) < 1e-6 and t < -0.05
    assert float(margins.min()) == pytest.approx(t, abs=1e-9)
    with pytest.raises(ValueError, match=r"not together.*worst margin -0\.\d+.*sentiment .*alone up to"):
        check_feasible(q_bar, b, ["sentiment", "conciseness"])
    easy = torch.tensor([0.45, 0.45], dtype=D)  # the uniform policy gives 0.5 on both
    assert check_feasible(q_bar, easy, ["sentiment", "conciseness"]) == pytest.approx(
        _maxmin_by_grid(q_bar, easy), abs=1e-6)


def test_thresholds_on_the_boundary_are_refused_as_degenerate():
    """At the best achievable win-rate, alone or jointly, no finite λ meets the constraint (λ grows
    without bound under the dual steps): refused before training, saying so."""
    p_bar, q_bar = _bandit()
    best = best_achievable(q_bar)
    lam, _ = _dual(p_bar, q_bar, best, 0.1, steps=2000)
    lam_longer, _ = _dual(p_bar, q_bar, best, 0.1, steps=4000)
    assert float(lam_longer) > float(lam) + 0.1  # still climbing: no fixed point
    with pytest.raises(ValueError, match="degenerate MOPO thresholds.*grow without bound"):
        check_feasible(q_bar, best, ["sentiment"])

    q2 = _opposed(seed=3)
    t, _ = joint_margins(q2, torch.tensor([0.3, 0.3], dtype=D))
    on_edge = torch.tensor([0.3, 0.3], dtype=D) + t  # the max-min point's margins are now exactly 0
    with pytest.raises(ValueError, match="degenerate"):
        check_feasible(q2, on_edge, ["sentiment", "conciseness"])
    check_feasible(q2, on_edge - 1e-3, ["sentiment", "conciseness"])


def test_solve_dual_is_the_fixed_point_of_the_dual_steps():

    p_bar, q_bar = _bandit()
    tau = 0.1
    unconstrained = constraint_values(mopo_ratios(p_bar, q_bar, torch.zeros(1, dtype=D), tau), q_bar)
    b = torch.tensor([float(unconstrained) + 0.1], dtype=D)
    lam_steps, _ = _dual(p_bar, q_bar, b, tau)
    lam = solve_dual(p_bar, q_bar, b, tau)
    assert abs(float(lam) - float(lam_steps)) < 1e-6 and float(lam) > 0.1
    assert torch.equal(dual_step(lam, b, constraint_values(mopo_ratios(p_bar, q_bar, lam, tau), q_bar), 2.0)
                       .sub(lam).abs().lt(1e-9), torch.tensor([True]))
    slack = torch.tensor([float(q_bar.min())], dtype=D)
    assert float(solve_dual(p_bar, q_bar, slack, tau)) == 0.0
    # two constraints on several prompts, with a mask: both multipliers where the dual steps go
    g = torch.Generator().manual_seed(5)
    P, Q = torch.rand(3, 6, generator=g, dtype=D), torch.rand(3, 6, 2, generator=g, dtype=D)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    b2 = torch.tensor([0.62, 0.6], dtype=D)
    lam2 = solve_dual(P, Q, b2, 0.2, mask)
    steps = torch.zeros(2, dtype=D)
    for _ in range(40000):
        steps = dual_step(steps, b2, constraint_values(mopo_ratios(P, Q, steps, 0.2, mask), Q, mask), 0.5)
    torch.testing.assert_close(lam2, steps, rtol=0, atol=1e-6)
    rep = constraint_report(P, Q, lam2, b2, 0.2, ["a", "b"], slack=0.0, mask=mask)
    for k, thr in zip("ab", b2.tolist()):
        assert rep[k]["threshold"] == thr and (rep[k]["estimate"] >= thr - 1e-6) and rep[k]["lambda"] >= 0
    low = constraint_report(P, Q, torch.zeros(2, dtype=D), torch.tensor([0.99, 0.0], dtype=D), 0.2, ["a", "b"],
                            slack=0.01, mask=mask)
    assert low["a"]["satisfied"] is False and low["b"]["satisfied"] is True
