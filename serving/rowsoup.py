"""Personalized Soups for a batch whose rows ask for different weight vectors, in one forward.

A soup's parameters are ``θ = Σ_k w_k θ_k`` (docs/algorithms.md §6). Every leaf module of a causal
LM that holds parameters -- linear layers, embeddings, norms -- computes an output that is affine
in its own parameters for a fixed input (``x Wᵀ + b``, a row of ``E``, ``f(x) · g + b``), so with
``Σ_k w_k = 1`` the merged module's output is ``Σ_k w_k · module_k(x)``. :class:`RowSoup` runs each
leaf of the K policies on the batch and mixes their outputs with each row's own weights; whatever
holds no parameters (attention, rotary embeddings, activations) runs once on the mixed values.
Row ``b``'s logits are then those of the model merged with row ``b``'s vector, without merging
anything: no copy of any weight, the K policies' own modules are called.

Cost: each parameterised layer runs once per policy whose weight is non-zero in some row (as the
logits mode's K forwards), attention once.
"""

from __future__ import annotations

from typing import List, Sequence

import torch


class _MixedLeaf(torch.nn.Module):
    """One leaf position of the model: the K policies' modules there, outputs mixed per row."""

    def __init__(self, modules: Sequence[torch.nn.Module], soup: "RowSoup"):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)  # the policies' own modules: shared, never copied
        self.soup = soup

    @property
    def weight(self) -> torch.Tensor:
        """Policy 0's weight (where callers look up the device and dtype)."""
        return self.parts[0].weight

    def forward(self, x, *args, **kwargs):
        w = self.soup.weights  # (B, K) on the models' device
        if w.shape[0] != x.shape[0]:
            raise RuntimeError(f"per-row soup: {w.shape[0]} weight vectors selected for a batch of {x.shape[0]} rows")
        out = None
        for k in self.soup.active:
            y = self.parts[k](x, *args, **kwargs)
            term = y * w[:, k].to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            out = term if out is None else out + term
        return out


class RowSoup:
    """The K policies (one architecture) as one model whose rows each decode their own soup.

    ``RowSoup(models).model`` is a causal LM sharing the policies' modules; set the batch's
    weights with :meth:`select_rows` (``(B, K)``, rows on the simplex) before each forward, and
    again whenever rows leave the batch."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        self.models = list(models)
        self.weights = torch.zeros(0, len(self.models))
        self.active: List[int] = list(range(len(self.models)))
        first = self.models[0]
        leaves = [name for name, m in first.named_modules() if any(True for _ in m.parameters(recurse=False))]
        # policy 0's architecture as new module objects holding no parameters (buffers such as
        # rotary frequencies shared); each leaf with parameters becomes a mixed leaf
        self.model = _shell(first)
        for name in leaves:
            parent, _, child = name.rpartition(".")
            holder = self.model.get_submodule(parent) if parent else self.model
            holder._modules[child] = _MixedLeaf([m.get_submodule(name) for m in self.models], self)

    def select_rows(self, weights: torch.Tensor) -> None:
        """The weight vectors of the batch's rows, ``(B, K)``; policies with weight 0 in every row
        are skipped."""
        if weights.shape[1] != len(self.models):
            raise ValueError(f"{weights.shape[1]} weights per row for {len(self.models)} policies")
        self.active = [k for k in range(len(self.models)) if bool((weights[:, k] != 0).any())]
        self.weights = weights.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.models[0].get_input_embeddings().weight.device


def _shell(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module``: new module objects all the way down (so swapping a child
    never touches the policy), parameters left out, buffers shared."""
    import copy

    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = {}
    clone._buffers = dict(module._buffers)
    clone._modules = {name: _shell(child) if child is not None else None
                      for name, child in module._modules.items()}
    for hooks in ("_forward_hooks", "_forward_pre_hooks"):
        if hooks in clone.__dict__:
            clone.__dict__[hooks] = type(module.__dict__[hooks])(module.__dict__[hooks])
    return clone
