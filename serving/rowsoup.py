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

Policies trained with LoRA from one base differ only in their adapters: :class:`LoraRowSoup` runs
one forward of policy 0 and adds, in each adapted linear layer, ``Σ_k c_k s_k B_k A_k x`` per row
with ``c = w − e_0`` (policy 0's weight already holds ``s_0 B_0 A_0``), which is the LoRA soup
``W_base + Σ_k w_k s_k B_k A_k`` because ``Σ_k w_k = 1``: one base forward plus K low-rank ones.
Adapters stored alone on one base (a conditioned policy's vertices, §9) run on the bare base with
``c = w``; :meth:`LoraRowSoup.vertex` is vertex k alone, the base's modules plus its adapter.
"""

from __future__ import annotations

import functools
import logging
import types
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from trainers.core.export import LoraFactors, load_lora_factors, policy_files

log = logging.getLogger(__name__)


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
            part = self.parts[k]
            dev = _execution_device(part)  # policy k's GPU: its inputs go there, its output comes back
            y = part(*_to(dev, x, *args), **{key: _to(dev, v)[0] for key, v in kwargs.items()}).to(x.device)
            term = y * w[:, k].to(y.device, y.dtype).view(-1, *([1] * (y.dim() - 1)))
            out = term if out is None else out + term
        return out


def _execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device (offloaded weights wait on
    ``meta`` until the hook loads them), else its weights' device."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return next(module.parameters()).device


def _to(device: torch.device, *values):
    """``values`` with their tensors on ``device`` (anything else as it is)."""
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


class _PerRowSoup:
    """What both per-row soups share: the K policies, the width check of a batch's weights, the device."""

    models: List[torch.nn.Module]

    def _check_width(self, weights: torch.Tensor) -> None:
        if weights.shape[1] != self.width:
            raise ValueError(f"{weights.shape[1]} weights per row for {self.width} policies")

    @property
    def width(self) -> int:
        return len(self.models)

    @property
    def device(self) -> torch.device:
        return _execution_device(self.models[0].get_input_embeddings())


class RowSoup(_PerRowSoup):
    """The K policies (one architecture) as one model whose rows each decode their own soup.

    ``RowSoup(models).model`` is a causal LM sharing the policies' modules; set the batch's
    weights with :meth:`select_rows` (``(B, K)``, rows on the simplex) before each forward, and
    again whenever rows leave the batch."""

    kind = "full"  # each parameterised layer of every policy runs

    def __init__(self, models: Sequence[torch.nn.Module]):
        self.models = list(models)
        self.weights = torch.zeros(0, len(self.models))
        self.active: List[int] = list(range(len(self.models)))
        self.model = _with_leaves(self.models[0], lambda name, _: _MixedLeaf([m.get_submodule(name) for m in self.models], self))

    def select_rows(self, weights: torch.Tensor) -> None:
        """The weight vectors of the batch's rows, ``(B, K)``; policies with weight 0 in every row
        are skipped."""
        self._check_width(weights)
        self.active = [k for k in range(len(self.models)) if bool((weights[:, k] != 0).any())]
        self.weights = weights.to(self.device)


class _LoraMixedLinear(torch.nn.Module):
    """An adapted linear layer of policy 0 plus each row's ``Σ_k c_k s_k B_k A_k x``."""

    def __init__(self, base: torch.nn.Linear, factors: Sequence[Tuple[torch.Tensor, torch.Tensor, float]],
                 soup: Optional["LoraRowSoup"]):
        super().__init__()
        self.base, self.soup = base, soup
        dev, dt = base.weight.device, base.weight.dtype
        # the K adapters stacked: two matmuls per layer whatever K is; s_k folded into B_k
        self.register_buffer("A", torch.cat([A for A, _, _ in factors]).to(dev, dt), persistent=False)
        self.register_buffer("B", torch.cat([B.float() * s for _, B, s in factors], dim=1).to(dev, dt),
                             persistent=False)
        self.ranks = tuple(A.shape[0] for A, _, _ in factors)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x):
        if self.soup is None:  # one adapter, always on (a vertex alone)
            return self.base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, self.A), self.B)
        c = self.soup.rows(x.shape[0], self.ranks, x.device, x.dtype)  # (B, Σ ranks)
        c = c.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return self.base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, self.A) * c, self.B)


class LoraRowSoup(_PerRowSoup):
    """K LoRA policies of one base as one model whose rows each decode their own soup: policy 0's
    modules plus the K adapters' factors (``factors[k]``: as :func:`trainers.core.export.load_lora_factors`
    reads them). Same interface as :class:`RowSoup`. With ``bare_base``, ``models`` is ``[base]``,
    the weights under every adapter (adapters stored alone), and a row's coefficients are its weights.

    Raises ValueError when the policies are not one base plus these adapters: adapted layers that
    differ, a layer other than ``torch.nn.Linear``, any other weight that differs between policies,
    or an adapted weight whose ``W_k − s_k B_k A_k`` is not the same base for every k."""

    kind = "lora"  # policy 0's forward plus the K adapters

    def __init__(self, models: Sequence[torch.nn.Module], factors: Sequence[LoraFactors], bare_base: bool = False):
        if (len(models) != 1) if bare_base else (len(factors) != len(models)):
            raise ValueError(f"{len(factors)} adapters for {len(models)} models" + (", not one bare base" if bare_base else ""))
        self.models, self.factors, self.bare_base = list(models), list(factors), bare_base
        self.coefficients = torch.zeros(0, len(factors))
        self.expanded: dict = {}  # (ranks, device, dtype) -> the coefficients repeated per rank
        self.targets = set(factors[0])
        if any(set(f) != self.targets for f in factors[1:]):
            raise ValueError("the policies' adapters adapt different layers")
        params = [dict(m.named_parameters()) for m in self.models]
        if any(p.device.type == "meta" for ps in params for p in ps.values()):
            raise ValueError("the policies' weights are offloaded (on meta until a hook loads them)")
        for name, p in params[0].items():
            if name in self.targets and not bare_base:
                _check_base(name, [ps[name] for ps in params], [f[name] for f in factors])
            elif any(not torch.equal(p, ps[name].to(p.device)) for ps in params[1:]):
                raise ValueError(f"{name} differs between the policies, and no adapter explains it")
        self.model = self._adapted(self.factors, self)

    @property
    def width(self) -> int:
        return len(self.factors)

    def _adapted(self, factors: Sequence[LoraFactors], soup) -> torch.nn.Module:
        """Policy 0's model with each adapted linear layer adding ``factors``' updates scaled by ``soup.rows``."""
        return _with_leaves(self.models[0], lambda name, m: self._leaf(name, m, factors, soup))

    def _leaf(self, name: str, m: torch.nn.Module, factors: Sequence[LoraFactors], soup) -> torch.nn.Module:
        if name + ".weight" not in self.targets:
            return m  # the same in every policy: policy 0's own module
        if type(m) is not torch.nn.Linear:
            raise ValueError(f"{name} is a {type(m).__name__}; per-row LoRA soups handle torch.nn.Linear")
        return _LoraMixedLinear(m, [f[name + ".weight"] for f in factors], soup)

    def vertex(self, k: int) -> torch.nn.Module:
        """Policy ``k`` alone on the bare base (its adapter unmerged; no weight copied)."""
        if not self.bare_base:
            raise ValueError("vertex views are for adapters stored alone on a bare base")
        return self._adapted([self.factors[k]], None)

    def select_rows(self, weights: torch.Tensor) -> None:
        """The weight vectors of the batch's rows, ``(B, K)``, rows on the simplex."""
        self._check_width(weights)
        c = weights.to(self.device, torch.float32).clone()
        if not self.bare_base:
            c[:, 0] -= 1.0
        self.coefficients, self.expanded = c, {}

    def rows(self, n: int, ranks: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The selected coefficients of a batch of ``n`` rows, policy k's repeated ``ranks[k]`` times:
        ``(n, Σ ranks)``, built once per selection for all the layers that share ``ranks``."""
        if self.coefficients.shape[0] != n:
            raise RuntimeError(f"per-row soup: {self.coefficients.shape[0]} weight vectors selected for a batch of {n} rows")
        key = (ranks, device, dtype)
        if key not in self.expanded:
            self.expanded[key] = self.coefficients.to(device, dtype).repeat_interleave(
                torch.tensor(ranks, device=device), dim=1, output_size=sum(ranks))
        return self.expanded[key]


def shared_base(dirs: Sequence[str]) -> Optional[str]:
    """The base checkpoint when every policy is an adapter stored alone on that one base (a
    conditioned policy's vertices): served as the base once plus the K adapters."""
    files = [policy_files(d) for d in dirs]
    bases = {str(Path(f.weights).resolve()) for f in files}
    return files[0].weights if all(f.adapter_only for f in files) and len(bases) == 1 else None


def per_row_soup(models: Sequence[torch.nn.Module], dirs: Sequence[str]):
    """The per-row soup for these policies: base forward plus the K adapters when every policy is
    one base plus its LoRA adapter (``adapter/``), else the K full-weight policies layer by layer."""
    files = [policy_files(d) for d in dirs]
    if all(f.adapter and not f.adapter_only for f in files):
        try:
            return LoraRowSoup(models, [load_lora_factors(f.adapter) for f in files])
        except ValueError as e:
            log.warning("per-row soups run over the full weights: the LoRA policies are not one base plus "
                        "their adapters (%s)", e)
    return RowSoup(models)


def _check_base(name: str, weights: Sequence[torch.Tensor], factors) -> None:
    """``W_k − s_k B_k A_k`` is one base weight for every k (to the weights' rounding)."""
    for W, (A, B, _) in zip(weights, factors):
        if (B.shape[0], A.shape[1]) != tuple(W.shape) or A.shape[0] != B.shape[1]:
            raise ValueError(f"{name}: adapter factors {tuple(B.shape)} x {tuple(A.shape)} for a weight of {tuple(W.shape)}")
    with torch.no_grad():
        bases = [W.float() - s * (B.to(W.device).float() @ A.to(W.device).float()) for W, (A, B, s) in zip(weights, factors)]
        tol = 8 * torch.finfo(weights[0].dtype).eps * float(weights[0].abs().max())
        for k, b in enumerate(bases[1:], 1):
            gap = float((b - bases[0].to(b.device)).abs().max())
            if gap > tol:
                raise ValueError(f"{name}: policy {k} minus its adapter is not policy 0 minus its adapter "
                                 f"(they differ by up to {gap:.3g}); not one base")


def _with_leaves(first: torch.nn.Module, replace) -> torch.nn.Module:
    """``first``'s architecture as new module objects holding no parameters (buffers such as
    rotary frequencies shared), each leaf with parameters replaced by ``replace(name, leaf)``."""
    model = _shell(first)
    for name, m in first.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            parent, _, child = name.rpartition(".")
            (model.get_submodule(parent) if parent else model)._modules[child] = replace(name, m)
    return model


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
    # accelerate's hooks (device_map, offload) are instance attributes bound to the policy's module
    # (forward = partial(new_forward, module), _old_forward = module.forward): bound to the copy
    # instead, else the copy would run the policy's own children and never the mixed leaves
    for key, value in module.__dict__.items():
        rebound = _rebind(value, module, clone)
        if rebound is not value:
            clone.__dict__[key] = rebound
    if "forward" in clone.__dict__ and "_old_forward" in clone.__dict__:
        functools.update_wrapper(clone.__dict__["forward"], clone.__dict__["_old_forward"])
    return clone


def _rebind(value, old: torch.nn.Module, new: torch.nn.Module):
    """``value`` bound to ``new`` where it is a method or a partial bound to ``old``, else itself."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is old:
        return functools.partial(value.func, new, *value.args[1:], **value.keywords)
    return value
