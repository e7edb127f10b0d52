"""MOPO: constrained multi-objective preference optimisation (ALGORITHMS.md §4), pure functions.

A prompt comes with ``n`` candidate responses (dataset responses or samples from π_ref). Shapes:
``B`` prompts, ``n`` candidates, ``J`` secondary (constrained) objectives.

- :func:`win_rates`: ``p̄(y_i) = (1/n) Σ_j p(y_i ≻ y_j)`` from scores (Bradley–Terry
  probabilities ``σ(s_i − s_j)``) or from a preference matrix; ``p(y ≻ y) = ½``.
- :func:`mopo_ratios`: ``ρ_λ(y_i) = n · softmax_i((p̄ + λᵀq̄)/τ)`` -- the closed-form ratio π/π_ref on
  the candidates, normalised per prompt (the decision in §4).
- :func:`mopo_policy_loss`: weighted behaviour cloning ``−Σ_i sg(ρ_i) log π_θ(y_i|x) / n``.

Prompts with fewer candidates than others (unscorable samples dropped) pass a ``mask (B, n)``.
- :func:`constraint_values`, :func:`dual_step`: ``Ê_{π_λ}[q̄]`` and ``λ ← max(0, λ + η(b − Ê))``.
- :func:`check_feasible`, :func:`check_multipliers`: infeasible thresholds fail before training,
  and a multiplier past its bound stops training, naming the constraint.
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


def mopo_policy_loss(policy_logps: Tensor, rho: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Weighted behaviour cloning per prompt ``(B,)``: ``−Σ_i sg(ρ_bi) log π_θ(y_bi|x_b) / n_b``
    (the caller takes the mean). ``policy_logps (B, n)``: summed response log-probs of every
    candidate under the policy; ``mask`` as in :func:`mopo_ratios`."""
    weights = rho.detach() if mask is None else rho.detach().masked_fill(~mask, 0.0)
    return -(weights * policy_logps).sum(1) / _counts(mask, policy_logps)[:, 0]


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


def check_feasible(q_bar: Tensor, thresholds: Tensor, names: Sequence[str]) -> None:
    """Refuse thresholds no policy over the candidates can meet (each constraint alone)."""
    best = best_achievable(q_bar)
    bad = [f"{n}: threshold {float(b):.4f} > best achievable {float(v):.4f}"
           for n, b, v in zip(names, thresholds, best) if float(b) > float(v)]
    if bad:
        raise ValueError("infeasible MOPO thresholds (win-rates against the candidates): " + "; ".join(bad))


def check_multipliers(lam: Tensor, bound: float, names: Sequence[str], values: Tensor, thresholds: Tensor) -> None:
    """Stop when a multiplier passes ``bound``: that constraint cannot be met by this policy."""
    over = [f"{n} (lambda {float(v):.3g}, value {float(x):.4f} < threshold {float(b):.4f})"
            for n, v, x, b in zip(names, lam, values, thresholds) if float(v) > bound]
    if over:
        raise RuntimeError(f"MOPO constraints look infeasible, multipliers passed {bound}: " + "; ".join(over))
