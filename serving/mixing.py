"""Post-hoc mixing of per-objective policies as pure functions (docs/algorithms.md §3a and §6), and
the table of mixing modes (:data:`MIXING_MODES`). Weight vectors are checked by
:func:`trainers.core.weights.check_weights`.

- :func:`mix_logits`: MPO's per-token log-linear mixture
  ``Σ_k w_k · logits_k + (1 − Σw) · logits_ref``; shapes ``(K, B, V)`` -> ``(B, V)``.
- :func:`soup_state_dicts`: Personalized Soups on full weights, ``θ = Σ_k w_k θ_k``.
- :func:`merge_lora`: Soups on LoRA adapters, ``W = W_base + Σ_k w_k s_k B_k A_k`` (products, never
  the factors), every other tensor bitwise the base's.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from trainers.core.export import LoraFactors, add_lora


# the mixing modes a request or a config names; validation, /v1/objectives, help and the engine read it
MIXING_MODES: Dict[str, str] = {
    "logits": "MPO's per-token log-linear mixture softmax(Σ_k w_k logits_k): the K policies decode in lock-step",
    "soup": "Personalized Soups: the weights Σ_k w_k θ_k merged per vector, then one model decodes",
}


def check_mixing(mode: str, what: str = "mixing") -> str:
    """``mode`` if it names a mixing mode, else a ValueError naming ``what`` and the modes (the one
    check of a mode, for configs, flags and request bodies alike)."""
    if not isinstance(mode, str) or mode not in MIXING_MODES:
        raise ValueError(f"{what} must be {' or '.join(repr(m) for m in MIXING_MODES)}, got {mode!r}")
    return mode


def mix_logits(logits: torch.Tensor, weights: torch.Tensor, ref_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MPO per-token mixture (§3a): ``Σ_k w_k logits_k + (1 − Σ_k w_k) logits_ref``.

    ``logits (K, B, V)``; ``weights (K,)`` shared by the batch or ``(B, K)`` one vector per row;
    ``ref_logits (B, V)`` (needed only when the weights of a row do not sum to 1). Returns the
    mixed logits ``(B, V)``; ``softmax`` of them is the per-token product of the K distributions.
    """
    # checked where the weights are: host weights (the server's) cost the GPU no sync
    rest = 1 - (weights.sum(-1) if weights.dim() == 2 else weights.sum())  # (B,) or ()
    partial = bool((rest.abs() > 1e-6).any())  # float32 weights normalised to 1 are off by ~1e-7
    if partial and ref_logits is None:
        raise ValueError("weights do not sum to 1: the reference policy's logits are needed")
    w = weights.to(logits.device, logits.dtype)
    w = w.T[:, :, None] if w.dim() == 2 else w[:, None, None]  # (K, B|1, 1)
    mixed = (w * logits).sum(0)
    if partial:
        mixed = mixed + (1 - w.sum(0)) * ref_logits.to(logits.dtype)
    return mixed


def soup_state_dicts(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Personalized Soups on full weights (§6): ``Σ_k w_k θ_k`` per floating-point tensor.

    A weight of exactly 1 on one model returns that model's tensors bitwise (1·a + 0·b = a). Integer
    tensors (buffers) must agree and are copied. Every state must have the same keys and shapes.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} models but {len(weights)} weights")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))[:5]
            raise ValueError(f"model {i} has different tensors from model 0 (e.g. {diff}): not one architecture")
    out = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"tensor {key} has different shapes across models: {[tuple(t.shape) for t in tensors]}")
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ValueError(f"non-float tensor {key} differs across models")
            out[key] = tensors[0].clone()
            continue
        out[key] = soup_tensor(tensors, weights)
    return out


def soup_tensor(tensors: Sequence[torch.Tensor], weights: Sequence[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_k w_k t_k`` for one floating-point tensor, summed in float64 on the tensors' own device
    (the order of the models does not show in the rounded result), returned in their dtype --
    written into ``out`` when given (a merged model's parameter, updated in place)."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for w, t in zip(weights, tensors):
        acc += t.to(acc.device, torch.float64) * w
    if out is None:
        return acc.to(tensors[0].dtype)
    return out.copy_(acc)




def merge_lora(base: Mapping[str, torch.Tensor], adapters: Sequence[LoraFactors], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Personalized Soups on LoRA (§6): ``W = W_base + Σ_k w_k · s_k · B_k A_k``.

    ``adapters[k]`` maps a base weight name (e.g. ``model.layers.0.self_attn.q_proj.weight``) to
    ``(A (r, in), B (out, r), scaling s)``. The products are merged, never A and B separately
    (Σ w B · Σ w A ≠ Σ w BA). Tensors no adapter touches are returned as the base's own tensors.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    out = dict(base)
    for name in sorted(set().union(*[set(a) for a in adapters])):
        if name not in base:
            raise ValueError(f"adapter targets {name}, which the base model does not have")
        out[name] = add_lora(base[name], [(w, a[name]) for w, a in zip(weights, adapters) if name in a])
    return out
