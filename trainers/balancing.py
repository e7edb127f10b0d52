"""Gradient balancing across objectives (docs/algorithms.md §5: GAPO and P-GAPO) as pure functions.

Inputs are the per-objective gradients on the balancing parameter set, flattened: ``grads (K, D)``,
or their K×K Gram matrix; under data parallelism the Gram matrix of the workers' averaged
gradients (:func:`averaged_gram`), not the average of per-rank Gram matrices. Outputs are detached
coefficients ``c (K,)`` for one backward of ``Σ_i c_i L_i``.

- :func:`min_norm_weights`: ``α* = argmin_{α∈Δ} ‖Σ α_i u_i‖²`` from the Gram matrix ``U Uᵀ``
  (closed form for K = 2, Frank–Wolfe for K > 2).
- :func:`gapo_coefficients`: ``g̃_i = g_i/(‖g_i‖+ε)^p``, ``α*`` on them, ``c_i = α*_i/(‖g_i‖+ε)^p``.
- :func:`pgapo_coefficients`: ``c_i = λ_i/(‖g_i‖+ε)`` for a user preference ``λ ∈ Δ``.

ε is relative to the largest ‖g_i‖ and the min-norm solver normalises its Gram matrix, so ``α*``
does not depend on the gradients' overall scale (LM-head gradients of large models are ~1e-7).
The coefficients come back on the gradients' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

Tensor = torch.Tensor


def min_norm_weights(gram: Tensor, iters: int = 2000, tol: float = 1e-14, frank_wolfe: bool = False) -> Tensor:
    """The min-norm point of the convex hull of vectors with Gram matrix ``gram (K, K)``: ``α (K,)``
    (float64, on the CPU: the K×K problem is tiny whatever device the gradients live on).

    Scale-free: ``α*`` of ``s·G`` is ``α*`` of ``G``, so the Gram matrix is divided by its largest
    diagonal entry first and every tolerance is relative to that.
    K = 2: ``γ = clip(⟨u2−u1, u2⟩ / ‖u1−u2‖², 0, 1)``, ``α = (γ, 1−γ)``, ``γ = ½`` when ``u1 = u2``.
    K > 2 (or ``frank_wolfe=True``): Frank–Wolfe with away steps and exact line search from the
    uniform point, stopped when the Frank–Wolfe gap is below ``tol``; then the support it found is
    solved exactly (:func:`_on_face`) and kept when it passes the optimality check.
    """
    K = gram.shape[0]
    gram = gram.detach().double().cpu()
    if K == 1:
        return torch.ones(1, dtype=torch.float64)
    top = float(gram.diagonal().max())
    if not (top > 0 and torch.isfinite(gram).all()):  # all gradients zero (or broken): nothing to balance
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    gram = gram / top
    if K == 2 and not frank_wolfe:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        if float(denom) <= 1e-15:  # u1 = u2 up to rounding: every γ gives the same point
            return torch.tensor([0.5, 0.5], dtype=torch.float64)
        gamma = float(((gram[1, 1] - gram[0, 1]) / denom).clamp(0.0, 1.0))
        return torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64)
    alpha = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for _ in range(iters):
        grad = gram @ alpha  # ∂(½ αᵀGα)/∂α
        value = alpha @ grad
        t = int(torch.argmin(grad))
        support = alpha > 0
        a = int(torch.where(support, grad, torch.full_like(grad, -torch.inf)).argmax())
        fw_gap, away_gap = float(value - grad[t]), float(grad[a] - value)
        if fw_gap <= tol:  # the Frank–Wolfe gap bounds the distance to the optimum's value
            break
        direction = -alpha.clone()
        if fw_gap >= away_gap:  # toward the best vertex
            direction[t] += 1.0
            max_step = 1.0
        else:  # away from the worst vertex in the support (linear convergence on faces)
            direction = alpha.clone()
            direction[a] -= 1.0
            max_step = float(alpha[a] / (1 - alpha[a])) if float(alpha[a]) < 1 else 1.0
        curvature = float(direction @ gram @ direction)
        if curvature <= 1e-30:
            break
        step = min(max(-float(direction @ grad) / curvature, 0.0), max_step)
        alpha = (alpha + step * direction).clamp_min(0.0)
        alpha = alpha / alpha.sum()
    exact = _on_face(gram, alpha > 1e-12)
    return exact if exact is not None and _certified(gram, exact, tol) else alpha


def _on_face(gram: Tensor, support: Tensor) -> Optional[Tensor]:
    """The min-norm point of the affine hull of the ``support``'s vectors:
    ``α_S = G_S⁻¹1 / 1ᵀG_S⁻¹1`` (None when it leaves the simplex or ``G_S`` is singular)."""
    idx = torch.nonzero(support).flatten()
    if len(idx) == 0:
        return None
    sub = gram[idx][:, idx]
    try:
        x = torch.linalg.solve(sub, torch.ones(len(idx), dtype=torch.float64))
    except RuntimeError:  # singular: linearly dependent gradients on this face
        return None
    if not bool(torch.isfinite(x).all()) or float(x.sum()) <= 0 or bool((x < 0).any()):
        return None
    alpha = torch.zeros(gram.shape[0], dtype=torch.float64)
    alpha[idx] = x / x.sum()
    return alpha


def _certified(gram: Tensor, alpha: Tensor, tol: float) -> bool:
    """KKT on the simplex: ``(Gα)_i ≥ αᵀGα`` for every ``i`` (the Frank–Wolfe gap is ≤ ``tol``)."""
    grad = gram @ alpha
    return float(alpha @ grad - grad.min()) <= max(tol, 1e-12)


@dataclass
class Balance:
    coefficients: Tensor  # c (K,), detached
    alpha: Tensor  # α* (K,)
    norms: Tensor  # ‖g_i‖ (K,)
    direction_norm: float  # ‖Σ α_i g̃_i‖
    cosine: Tensor  # (K, K) cosines between the objectives' gradients

    def log(self, names: Sequence[str]) -> Dict[str, float]:
        out = {f"alpha/{n}": float(a) for n, a in zip(names, self.alpha)}
        out.update({f"grad_norm/{n}": float(g) for n, g in zip(names, self.norms)})
        if len(names) == 2:
            out["grad_cosine"] = float(self.cosine[0, 1])
        return out


def _cosine(gram: Tensor, norms: Tensor) -> Tensor:
    return gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)


def gapo_coefficients(grads: Tensor, p: float = 1.0, eps: float = 1e-12) -> Balance:
    """GAPO (§5): MGDA on the per-objective gradients ``grads (K, D)`` scaled by ``1/(‖g_i‖+ε)^p``
    (see :func:`gapo_from_gram`)."""
    return gapo_from_gram(gram_of(grads), p, eps, grads.device)


def gapo_from_gram(gram: Tensor, p: float = 1.0, eps: float = 1e-12, device=None) -> Balance:
    """GAPO from the gradients' Gram matrix ``gram (K, K)`` (float64, CPU). With p = 1 every
    objective is normalised (scaling a loss by a constant changes nothing); p = 0 is plain MGDA.
    Exactly opposed normalised gradients give direction 0 (no step) without NaN. The coefficients
    come back on ``device``."""
    if p < 0:
        raise ValueError(f"p must be >= 0, got {p}")
    norms = _norms(gram)
    scale = (norms + _relative(eps, norms)) ** p
    tilde_gram = gram / (scale[:, None] * scale[None, :])
    alpha = min_norm_weights(tilde_gram)
    direction_sq = float(alpha @ tilde_gram @ alpha)
    return Balance((alpha / scale).to(device or "cpu"), alpha, norms, max(direction_sq, 0.0) ** 0.5,
                   _cosine(gram, norms))


def pgapo_coefficients(grads: Tensor, preference: Sequence[float], eps: float = 1e-12) -> Balance:
    """P-GAPO (§5): ``c_i = λ_i / (‖g_i‖+ε)`` for a preference ``λ`` on the simplex (see
    :func:`pgapo_from_gram`)."""
    return pgapo_from_gram(gram_of(grads), preference, eps, grads.device)


def pgapo_from_gram(gram: Tensor, preference: Sequence[float], eps: float = 1e-12, device=None) -> Balance:
    lam = torch.as_tensor(list(preference), dtype=torch.float64)
    if lam.shape[0] != gram.shape[0] or bool((lam < 0).any()) or abs(float(lam.sum()) - 1) > 1e-9:
        raise ValueError(f"preference must be {gram.shape[0]} non-negative weights summing to 1, got {list(preference)}")
    norms = _norms(gram)
    c = lam / (norms + _relative(eps, norms))
    direction_sq = float(c @ gram @ c)
    return Balance(c.to(device or "cpu"), lam, norms, max(direction_sq, 0.0) ** 0.5, _cosine(gram, norms))


def _relative(eps: float, norms: Tensor) -> float:
    """ε as a fraction of the largest norm, so that it guards a zero gradient without moving α at
    small gradient scales (absolute ε when every gradient is zero)."""
    return eps * float(norms.max()) or eps


def gram_of(grads: Tensor) -> Tensor:
    """The K×K Gram matrix of ``grads (K, D)``, formed on their device, returned in float64 on the
    CPU, where the K×K arithmetic happens."""
    g = grads.detach().double()
    return (g @ g.T).cpu()


def averaged_gram(grads: Tensor) -> Tensor:
    """The Gram matrix of the workers' *averaged* gradients (a Gram of per-rank gradients is not
    it), without any worker holding the averaged gradients: rank ``r`` receives the sum of every
    rank's slice ``r`` of ``grads (K, D)`` (one ``reduce`` per slice, what a reduce-scatter moves),
    takes that slice's Gram, and only the K×K Grams go through ``all_reduce``. float64, CPU."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    bounds = [grads.shape[1] * r // world for r in range(world + 1)]
    mine = None
    for owner in range(world):
        part = grads[:, bounds[owner]:bounds[owner + 1]].float().contiguous()  # fp32 sums, whatever the dtype
        dist.reduce(part, dst=owner)
        if owner == rank:
            mine = part.double() / world
    gram = mine @ mine.T
    dist.all_reduce(gram)
    return gram.cpu()


def _norms(gram: Tensor) -> Tensor:
    return gram.diagonal().clamp_min(0).sqrt()
