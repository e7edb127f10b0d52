"""Preference losses as pure functions (ALGORITHMS.md §0–§1).

Every function takes per-pair sequence log-probabilities -- the *sum* of the response tokens'
log-probs, prompt and padding masked out -- and returns per-pair tensors; the caller takes the
batch mean. Shapes: all inputs ``(B,)``; outputs ``(B,)``.

The registry ``LOSSES`` maps a name (``dpo``, ``ipo``) to its function so configs can pick one.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

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


LOSSES: Dict[str, Callable[..., LossOutput]] = {"dpo": dpo_loss, "ipo": ipo_loss}


def get_loss(name: str) -> Callable[..., LossOutput]:
    """Look a preference loss up by name; unknown names raise with the known ones listed."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None
