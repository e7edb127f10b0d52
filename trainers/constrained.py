"""MOPO's constrained optimisation (docs/algorithms.md §4) as pure functions; the job is
``trainers/jobs/mopo.py`` and its policy loss ``trainers.losses.weighted_bc_loss``.

A prompt comes with ``n`` candidate responses (dataset responses or samples from π_ref). Shapes:
``B`` prompts, ``n`` candidates, ``J`` secondary (constrained) objectives.

- :func:`win_rates`: ``p̄(y_i) = (1/n) Σ_j p(y_i ≻ y_j)`` from scores (Bradley–Terry
  probabilities ``σ(s_i − s_j)``) or from a preference matrix; ``p(y ≻ y) = ½``.
- :func:`mopo_ratios`: ``ρ_λ(y_i) = n · softmax_i((p̄ + λᵀq̄)/τ)`` -- the closed-form ratio π/π_ref on
  the candidates, normalised per prompt (the decision in §4).

Prompts with fewer candidates than others (unscorable samples dropped) pass a ``mask (B, n)``.
- :func:`constraint_values`, :func:`dual_step`: ``Ê_{π_λ}[q̄]`` and ``λ ← max(0, λ + η(b − Ê))``.
- :func:`check_feasible`, :func:`check_multipliers`: thresholds that cannot be met together (a
  linear programme over the candidates) or only on the boundary fail before training, and a
  multiplier past its bound stops training, naming the constraint.
- :func:`solve_dual`: the multipliers the dual steps converge to, solved on the whole candidate set;
  :func:`constraint_report`: each constraint's final estimate against its threshold.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def win_rates(scores: Optional[Tensor] = None, preferences: Optional[Tensor] = None) -> Tensor:
    """Win-rates against the candidate set: ``(B, n)``.

    ``scores (B, n)``: ``p(y_i ≻ y_j) = σ(s_i − s_j)`` (so ``p(y ≻ y) = ½`` by itself);
    ``preferences (B, n, n)``: labelled probabilities ``P[b, i, j] = p(y_i ≻ y_j)`` (the diagonal
    is taken as ½ whatever it holds). NaN scores (unscorable candidates) are refused.
    """
    if (scores is None) == (preferences is None):
        raise ValueError("give either scores or preferences")
    if scores is not None:
        if not torch.isfinite(scores).all():
            raise ValueError("scores contain non-finite values")
        P = torch.sigmoid(scores[:, :, None] - scores[:, None, :])
    else:
        P = preferences.clone()
        n = P.shape[-1]
        P[:, torch.arange(n), torch.arange(n)] = 0.5
    return P.mean(-1)


def _counts(mask: Optional[Tensor], like: Tensor) -> Tensor:
    """Candidates per prompt ``(B, 1)``: ``n`` everywhere, or the mask's row sums."""
    if mask is None:
        return torch.full((like.shape[0], 1), float(like.shape[1]), dtype=like.dtype, device=like.device)
    return mask.sum(1, keepdim=True).to(like.dtype)


def mopo_ratios(p_bar: Tensor, q_bar: Tensor, lam: Tensor, tau: float, mask: Optional[Tensor] = None) -> Tensor:
    """``ρ_λ (B, n) = n · softmax_i((p̄ + q̄ λ)/τ)``; ``p_bar (B, n)``, ``q_bar (B, n, J)``, ``lam (J,)``.

    ``mask (B, n)`` (bool, optional): which candidates exist, for prompts with fewer than ``n``;
    the softmax runs over those and ``n`` becomes each prompt's count (absent ones get ρ = 0).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = (p_bar + q_bar @ lam.to(q_bar.dtype)) / tau
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return _counts(mask, p_bar) * torch.softmax(logits, dim=1)


def constraint_values(rho: Tensor, q_bar: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``Ê_{π_λ}[q̄_j] = mean_b (1/n_b) Σ_i ρ_bi q̄_bij`` -> ``(J,)`` (see :func:`prompt_values`)."""
    return prompt_values(rho, q_bar, mask).mean(0)


def prompt_values(rho: Tensor, q_bar: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Each prompt's constraint values under π_λ, ``(B, J)``; absent candidates count for nothing."""
    q = q_bar if mask is None else q_bar.masked_fill(~mask[:, :, None], 0.0)
    return (rho[:, :, None] * q).sum(1) / _counts(mask, rho)


def dual_step(lam: Tensor, thresholds: Tensor, values: Tensor, eta: float) -> Tensor:
    """Projected dual ascent on the constraints: ``max(0, λ + η (b − Ê[q̄]))``."""
    return (lam + eta * (thresholds - values)).clamp_min(0.0)


def best_achievable(q_bar: Tensor) -> Tensor:
    """The largest value each constraint can reach on these candidates: ``mean_b max_i q̄_bij`` (J,);
    NaN marks an absent candidate."""
    return torch.nan_to_num(q_bar, nan=float("-inf")).max(dim=1).values.mean(0)


def joint_margins(q_bar: Tensor, thresholds: Tensor):
    """The best margin every constraint can keep at once: ``t* = max_π min_j (E_π[q̄_j] − b_j)``
    over per-prompt distributions ``π_b`` on the candidates (a linear programme), and each
    constraint's margin ``E_π*[q̄_j] − b_j`` at the maximiser. NaN marks an absent candidate.

    ``t* < 0``: the thresholds cannot be met together; ``t* = 0``: only on the boundary."""
    import numpy as np
    from scipy import sparse
    from scipy.optimize import linprog

    q = q_bar.detach().double().cpu().numpy()
    b = thresholds.detach().double().cpu().numpy()
    B, n, J = q.shape
    prompt, cand = np.nonzero(np.isfinite(q[:, :, 0]))  # one variable per present candidate, then t
    V = len(prompt)
    values = q[prompt, cand, :]  # (V, J)
    # E_π[q̄_j] − b_j ≥ t  ⇔  −(1/B) Σ π q̄_j + t ≤ −b_j
    A_ub = sparse.hstack([sparse.csr_matrix(-values.T / B), sparse.csr_matrix(np.ones((J, 1)))]).tocsr()
    A_eq = sparse.csr_matrix((np.ones(V), (prompt, np.arange(V))), shape=(B, V + 1))
    cost = np.zeros(V + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=A_ub, b_ub=-b, A_eq=A_eq, b_eq=np.ones(B),
                  bounds=[(0, None)] * V + [(None, None)], method="highs")
    if res.status != 0:
        raise RuntimeError(f"the MOPO feasibility programme failed: {res.message}")
    margins = values.T @ res.x[:V] / B - b
    return float(res.x[-1]), torch.tensor(margins, dtype=torch.float64)


def check_feasible(q_bar: Tensor, thresholds: Tensor, names: Sequence[str], tol: float = 1e-9) -> float:
    """Refuse thresholds no policy over the candidates can meet together, or only on the boundary;
    returns the joint margin ``t*`` (see :func:`joint_margins`).

    On the boundary (``t* = 0``, e.g. a threshold at its best achievable win-rate) only a policy
    that puts all its mass on the best candidates meets the constraints; with ``τ > 0`` π_λ never
    does, and the multiplier would grow without bound, so that is refused as degenerate too."""
    best = best_achievable(q_bar)
    alone = [f"{n}: threshold {float(b):.4f} > best achievable {float(v):.4f}"
             for n, b, v in zip(names, thresholds, best) if float(b) > float(v)]
    if alone:
        raise ValueError("infeasible MOPO thresholds (win-rates against the candidates): " + "; ".join(alone))
    t, margins = joint_margins(q_bar, thresholds)
    reached = "; ".join(f"{n} {float(b + m):.4f} (threshold {float(b):.4f}, margin {float(m):+.4f}, "
                        f"alone up to {float(v):.4f})" for n, b, m, v in zip(names, thresholds, margins, best))
    if t < -tol:
        raise ValueError("infeasible MOPO thresholds: each is within reach alone but not together; the best "
                         f"any policy over the candidates does for all at once (worst margin {t:+.4f}): {reached}")
    if t <= tol:
        raise ValueError("degenerate MOPO thresholds: they can only be met exactly on the boundary, by a policy "
                         "putting all its probability on the best candidates, which the KL term (tau > 0) never "
                         f"reaches -- the multipliers would grow without bound. Lower them below: {reached}")
    return t


def solve_dual(p_bar: Tensor, q_bar: Tensor, thresholds: Tensor, tau: float, mask: Optional[Tensor] = None,
               iters: int = 20000, tol: float = 1e-12) -> Tensor:
    """``λ* = argmin_{λ≥0} D(λ)``, ``D(λ) = mean_b τ log mean_i exp((p̄_bi + λᵀq̄_bi)/τ) − λᵀb``: the
    fixed point of :func:`dual_step` on these prompts (``∇D = Ê_{π_λ}[q̄] − b``). Projected gradient
    descent with step ``4τ/J`` (``∇D`` is ``J/(4τ)``-Lipschitz since ``q̄ ∈ [0, 1]``). ``(J,)``."""
    J = q_bar.shape[-1]
    lam = torch.zeros(J, dtype=torch.float64)
    p, q, b = p_bar.double(), q_bar.double(), thresholds.double()
    step = 4.0 * tau / J
    for _ in range(iters):
        values = constraint_values(mopo_ratios(p, q, lam, tau, mask), q, mask)
        new = (lam - step * (values - b)).clamp_min(0.0)
        moved = float((new - lam).abs().max())
        lam = new
        if moved <= tol * max(1.0, float(lam.abs().max())):
            break
    return lam


def constraint_report(p_bar: Tensor, q_bar: Tensor, lam: Tensor, thresholds: Tensor, tau: float,
                      names: Sequence[str], slack: float, mask: Optional[Tensor] = None) -> dict:
    """Per constraint: its threshold, the estimate ``Ê_{π_λ}[q̄_j]`` over every prompt at the
    multipliers ``lam``, the multiplier, and whether ``estimate ≥ threshold − slack``."""
    values = constraint_values(mopo_ratios(p_bar, q_bar, lam, tau, mask), q_bar, mask)
    return {n: {"threshold": float(b), "estimate": float(v), "lambda": float(x),
                "satisfied": bool(float(v) >= float(b) - slack)}
            for n, b, v, x in zip(names, thresholds, values, lam)}


def check_multipliers(lam: Tensor, bound: float, names: Sequence[str], values: Tensor, thresholds: Tensor) -> None:
    """Stop when a multiplier passes ``bound``: that constraint cannot be met by this policy."""
    over = [f"{n} (lambda {float(v):.3g}, value {float(x):.4f} < threshold {float(b):.4f})"
            for n, v, x, b in zip(names, lam, values, thresholds) if float(v) > bound]
    if over:
        raise RuntimeError(f"MOPO constraints look infeasible, multipliers passed {bound}: " + "; ".join(over))
