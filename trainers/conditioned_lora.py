"""The preference-conditioned LoRA of docs/algorithms.md §9: every adapted linear layer keeps its
frozen base weight ``W`` and gains K low-rank pairs, one per objective, scaled by the row's ``λ``,
plus an optional shared pair that is always on:

    h = W x + s·B_0 A_0 x + s·Σ_k λ_k B_k A_k x

The pairs are ordinary parameters of an :class:`ConditionedAdapter` child of each adapted layer
(``<layer>.conditioned.lora_A`` ``(K·r, in)``, ``lora_B`` ``(out, K·r)``, objective ``k``'s pair
the ``k``-th block of ``r`` rows / columns; ``shared_A`` ``(r0, in)``, ``shared_B`` ``(out, r0)``),
so DeepSpeed's ZeRO partitions and trains them like any weight, and the base keeps its HF names.
``λ`` reaches every layer through one :class:`Preference` the adapters share: set it before a
forward (:func:`set_preference`), ``None`` turns every adapter off (the model is ``π_ref``).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor
ADAPTER = "conditioned"  # the child module's name in each adapted layer


class Preference:
    """The λ of the current forward, shared by every adapter of a model: ``(N, 1, K)`` one per
    sequence, or ``(N, T, K)`` one per token (packed rows hold several sequences); None: adapters off."""

    def __init__(self):
        self.weights: Optional[Tensor] = None


class ConditionedAdapter(torch.nn.Module):
    """The K objective pairs (and the shared pair) of one linear layer; its output is added to the
    layer's. ``B`` start at 0, so the model starts as its base for every λ."""

    def __init__(self, in_features: int, out_features: int, objectives: int, rank: int, shared_rank: int,
                 scaling: float, preference: Preference, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.objectives, self.rank, self.scaling, self.preference = objectives, rank, scaling, preference
        self.lora_A = torch.nn.Parameter(torch.empty(objectives * rank, in_features, dtype=dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, objectives * rank, dtype=dtype))
        for k in range(objectives):  # each objective's A as peft initialises one
            torch.nn.init.kaiming_uniform_(self.lora_A.data[k * rank:(k + 1) * rank], a=math.sqrt(5))
        self.shared_A = self.shared_B = None
        if shared_rank:
            self.shared_A = torch.nn.Parameter(torch.empty(shared_rank, in_features, dtype=dtype))
            self.shared_B = torch.nn.Parameter(torch.zeros(out_features, shared_rank, dtype=dtype))
            torch.nn.init.kaiming_uniform_(self.shared_A, a=math.sqrt(5))
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        lam = self.preference.weights
        x = self.dropout(x)
        u = x @ self.lora_A.to(x.dtype).t()  # (N, T, K·r): every objective's A in one matmul
        u = u * lam.to(x.dtype).repeat_interleave(self.rank, dim=-1)
        out = u @ self.lora_B.to(x.dtype).t()
        if self.shared_A is not None:
            out = out + (x @ self.shared_A.to(x.dtype).t()) @ self.shared_B.to(x.dtype).t()
        return self.scaling * out

    def pair(self, k: int) -> Tuple[Tensor, Tensor]:
        """Objective ``k``'s ``(A_k (r, in), B_k (out, r))`` (views of the parameters)."""
        r = self.rank
        return self.lora_A[k * r:(k + 1) * r], self.lora_B[:, k * r:(k + 1) * r]


def _add_adapter(layer: torch.nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> Tensor:
    adapter = getattr(layer, ADAPTER)
    if adapter.preference.weights is None:  # adapters off: the base (π_ref)
        return output
    return output + adapter(inputs[0]).to(output.dtype)


def target_layers(model: torch.nn.Module, targets: Sequence[str]) -> List[str]:
    """The linear layers a list of names adapts, matched as peft matches ``target_modules`` (the
    name or its last components), so a vertex adapter loads onto exactly these layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer of the model matches target modules {list(targets)}")
    return names


def install(model: torch.nn.Module, objectives: int, rank: int, shared_rank: int, alpha: float,
            targets: Sequence[str], dropout: float = 0.0) -> Preference:
    """Freeze ``model`` and add a :class:`ConditionedAdapter` (scale ``alpha / rank``) to each target
    layer; returns the :class:`Preference` they read (also ``model.moray_preference``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    preference = Preference()
    scaling = alpha / rank
    for name in target_layers(model, targets):
        layer = model.get_submodule(name)
        dtype = layer.weight.dtype
        layer.add_module(ADAPTER, ConditionedAdapter(layer.in_features, layer.out_features, objectives, rank,
                                                     shared_rank, scaling, preference, dropout, dtype))
        layer.register_forward_hook(_add_adapter)
    model.moray_preference = preference
    return preference


def set_preference(model: torch.nn.Module, weights: Optional[Tensor]) -> None:
    """The λ every adapter of ``model`` (an engine's module, or the module) reads from now on:
    ``(N, 1, K)`` or ``(N, T, K)`` for an input of ``N`` rows, or None (adapters off)."""
    getattr(model, "module", model).moray_preference.weights = weights


def adapters(model: torch.nn.Module) -> Iterator[Tuple[str, ConditionedAdapter]]:
    """``(layer name, adapter)`` of every adapted layer."""
    for name, m in model.named_modules():
        if isinstance(m, ConditionedAdapter):
            yield name.removesuffix("." + ADAPTER), m


def is_adapter_tensor(name: str) -> bool:
    """Whether a parameter name is an adapter's (not part of the base checkpoint)."""
    return f".{ADAPTER}." in name


# --- λ per row -------------------------------------------------------------------------------

def _dirichlet(rng: np.random.Generator, k: int, concentration: float) -> np.ndarray:
    return rng.dirichlet(np.full(k, concentration))


def _vertex(rng: np.random.Generator, k: int, concentration: float) -> np.ndarray:
    return np.eye(k)[int(rng.integers(k))]


# how each row's λ is drawn (the job's `sampling`): a name a user types, one function each
SAMPLINGS: Dict[str, Callable[[np.random.Generator, int, float], np.ndarray]] = {
    "dirichlet": _dirichlet,  # λ ~ Dirichlet(concentration · 1_K)
    "vertices": _vertex,  # λ = e_j, j uniform: each row trains exactly one objective's pair
}


def row_preferences(idx: Sequence[int], seed: int, objectives: int, concentration: float, sampling: str) -> np.ndarray:
    """``(B, K)`` float64: each row's λ, from a generator seeded by ``(seed, row id)`` only, so a row
    gets the same λ in every epoch, on every worker and after a resume."""
    draw = SAMPLINGS[sampling]
    return np.stack([draw(np.random.default_rng([seed, int(i)]), objectives, concentration) for i in idx])


def token_preferences(batch: Dict[str, object], lam: Tensor) -> Tensor:
    """λ for a micro-batch of :mod:`trainers.batches`: ``(R·B, 1, K)`` for padded rows (each sequence
    its row's λ), ``(P, C, K)`` for packed ones (each token its sequence's; the free tail of a
    packed row, attended by nothing real, gets 0)."""
    B = lam.shape[0]
    if "pred_index" not in batch:
        return lam.repeat(batch["input_ids"].shape[0] // B, 1)[:, None, :]
    pos = batch["position_ids"].reshape(-1)
    span = torch.cumsum((pos == 0).long(), 0) - 1  # every sequence starts at position 0
    owner = torch.full((int(span.max()) + 1,), -1, dtype=torch.long, device=pos.device)
    owner[span[batch["pred_index"]]] = batch["pred_owner"]  # sequence s is response s // B of row s % B
    table = torch.cat([lam.new_zeros(1, lam.shape[1]), lam])  # index 0: no sequence
    rows = torch.where(owner >= 0, owner % B + 1, 0)
    return table[rows[span]].reshape(*batch["input_ids"].shape, lam.shape[1])


def vertex_factors(layers: Dict[str, Dict[str, Tensor]], k: int, rank: int) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Objective ``k``'s vertex as one ordinary LoRA per layer: ``A = [A_0; A_k]`` ``(r0+r, in)``,
    ``B = [B_0, B_k]`` ``(out, r0+r)``, so ``s·B A = s·(B_0 A_0 + B_k A_k)``. ``layers``: each
    layer's gathered ``lora_A``, ``lora_B`` (and ``shared_A``, ``shared_B``)."""
    out = {}
    for name, t in layers.items():
        A, B = t["lora_A"][k * rank:(k + 1) * rank], t["lora_B"][:, k * rank:(k + 1) * rank]
        if "shared_A" in t:
            A, B = torch.cat([t["shared_A"], A]), torch.cat([t["shared_B"], B], dim=1)
        out[name] = (A, B)
    return out
