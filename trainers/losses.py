"""Every loss Moray trains with, as pure functions (docs/algorithms.md §1, §2, §4, §5, §7).

Inputs are sequence log-probabilities -- the *sum* of the response tokens' log-probs, prompt and
padding masked out -- or scores; outputs are per-row losses (the caller takes the batch mean).

:data:`LOSSES` is the table of pair losses a job picks by name (``train.loss``: validation, the
CLI's ``--loss`` choices and its help all read it). Each takes four ``(B,)`` tensors (policy and
reference log-probs of chosen and rejected) and β, and returns ``(losses, chosen_rewards,
rejected_rewards)``, each ``(B,)``. The other losses belong to one job each: :func:`wrpo_loss`
(§7), :func:`conditioned_loss` (§9), :func:`bt_loss` (reward models, §2), :func:`weighted_bc_loss` (MOPO, §4),
:func:`policy_gradient_loss` (online GAPO, §5).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = Tuple[Tensor, Tensor, Tensor]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """DPO: ``-log σ(r(x,y_w) - r(x,y_l))`` with ``r = β (log π_θ - log π_ref)``.

    Args: four ``(B,)`` tensors of summed response log-probs; ``beta > 0``.
    Returns: ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. The rewards are
    detached (they are for logging).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -F.logsigmoid(logits)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """IPO: ``((log π_θ(y_w) - log π_ref(y_w)) - (log π_θ(y_l) - log π_ref(y_l)) - 1/(2β))²``.

    Same shapes and return values as :func:`dpo_loss`.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def wrpo_loss(
    policy_source_chosen_logps: Tensor,
    policy_target_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_source_chosen_logps: Tensor,
    ref_target_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    alpha: float,
) -> LossOutput:
    """WRPO (§7): ``-log σ(α r(x,y_ws) + (1-α) r(x,y_wt) - r(x,y_l))``, ``r = β (log π_θ - log π_ref)``.

    ``y_ws`` is the chosen response from the source models, ``y_wt`` the target's own chosen
    sample, ``y_l`` its rejected sample; six ``(B,)`` tensors, ``alpha`` in [0, 1] (see
    :func:`wrpo_alpha`). Returns ``(losses, chosen_rewards, rejected_rewards)`` with the chosen
    reward the α-weighted one (detached).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    r_ws = beta * (policy_source_chosen_logps - ref_source_chosen_logps)
    r_wt = beta * (policy_target_chosen_logps - ref_target_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    chosen = alpha * r_ws + (1.0 - alpha) * r_wt
    return -F.logsigmoid(chosen - r_l), chosen.detach(), r_l.detach()


def conditioned_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    signs: Tensor,
    weights: Tensor,
    beta: float,
) -> LossOutput:
    """The preference-conditioned policy's loss (§9): ``L_row = Σ_k λ_k |m_k| (−log σ(z_k(λ)))``.

    Four ``(B,)`` log-prob tensors of the two responses (the policy at each row's λ, the
    reference); ``signs`` ``(B, K)``: ``m_k`` = +1 where objective ``k`` prefers ``chosen``, −1 where
    it prefers ``rejected``, 0 where it ties or has no label; ``weights`` ``(B, K)``: each row's λ.
    ``z_k = β m_k [(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))]`` is DPO's logit
    in objective ``k``'s ordering. Returns ``(losses (B,), chosen_rewards, rejected_rewards)``,
    the rewards detached, in the chosen/rejected orientation.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    z = signs * (chosen - rejected)[:, None]  # (B, K)
    losses = (weights * signs.abs() * -F.logsigmoid(z)).sum(1)
    return losses, chosen.detach(), rejected.detach()


def wrpo_alpha(step: int, total_steps: int, alpha_max: float = 0.1) -> float:
    """The WRPO schedule ``α_t = α_max · min(1, t/T)`` over optimizer steps ``t`` of ``T``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
    return alpha_max * min(1.0, max(step, 0) / total_steps)


def loo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out baseline over a prompt's ``n`` samples: ``A_i = r_i − mean_{j≠i} r_j``.

    ``rewards (B, n)`` with ``n >= 2`` -> ``(B, n)``; every prompt's advantages sum to 0.
    """
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(f"a leave-one-out baseline needs >= 2 samples per prompt, got {n}")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (n - 1)


def policy_gradient_loss(policy_logps: Tensor, rewards: Tensor, ref_logps: Tensor, kl_coef: float) -> Tensor:
    """REINFORCE with a leave-one-out baseline and a KL penalty to the reference, per sample.

    ``policy_logps``, ``ref_logps``, ``rewards``: ``(B, n)`` -- summed response log-probs and one
    objective's rewards of ``n`` samples per prompt. The penalised reward is
    ``r − kl_coef · (log π_θ − log π_ref)`` (detached); returns ``−A · log π_θ`` ``(B, n)``, whose
    gradient is the policy-gradient estimate.
    """
    penalised = rewards - kl_coef * (policy_logps.detach() - ref_logps)
    return -loo_advantages(penalised).detach() * policy_logps


def bt_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Bradley–Terry loss per pair (§2): ``-log σ(s_w - s_l)``. Shapes ``(B,)`` -> ``(B,)``."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def weighted_bc_loss(policy_logps: Tensor, rho: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """MOPO's policy step (§4), weighted behaviour cloning per prompt ``(B,)``:
    ``−Σ_i sg(ρ_bi) log π_θ(y_bi|x_b) / n_b``. ``policy_logps (B, n)``: summed response log-probs of
    every candidate; ``rho (B, n)`` the closed-form ratios; ``mask (B, n)`` (bool, optional): which
    candidates exist (absent ones weigh nothing, ``n_b`` counts the present ones)."""
    weights = rho.detach() if mask is None else rho.detach().masked_fill(~mask, 0.0)
    counts = (torch.full_like(policy_logps[:, 0], policy_logps.shape[1]) if mask is None
              else mask.sum(1).to(policy_logps.dtype))
    return -(weights * policy_logps).sum(1) / counts


# the pair losses a job picks by name (train.loss); a new one is a function above and a line here
LOSSES: Dict[str, Callable[..., LossOutput]] = {"dpo": dpo_loss, "ipo": ipo_loss}


def get_loss(name: str) -> Callable[..., LossOutput]:
    """Look a preference loss up by name; unknown names raise with the known ones listed."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None
