"""MPO max-min weights by batch stochastic mirror descent (docs/algorithms.md §3b).

Pure functions on log-ratio arrays ``ell (P, m, K)`` -- ``ell[p, j, k] = log π_k(y_j|x_p) −
log π_ref(y_j|x_p)`` for ``m`` responses ``y_j ~ π_ref`` of prompt ``x_p`` -- all in float64 and
log-space:

- :func:`mpo_objective`: the estimate of ``F(λ) = E_x log E_y exp(λ·ℓ)``;
- :func:`bsmd_direction`: ``v_k = mean_x Σ_j softmax_j(λ·ℓ_j) ℓ_jk`` (∂F/∂λ_k) and the effective
  sample size of the softmax weights per prompt;
- :func:`bsmd`: the mirror-descent loop, returning the average iterate.

:func:`compute_mpo_weights` is the job behind ``moray mix mpo``: responses sampled from π_ref and
teacher-forced log-probs under the K+1 models, each a Ray Data stage; then BSMD on the driver
(sampling does not depend on λ, so every batch is drawn up front in one pass).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from reward_models.sampling import Generate, run_stages
from serving.policies import check_compatible
from trainers.core.logps import logits_needed, pad_sequences, sequence_logps
from trainers.core.models import Placement, load_tokenizer
from trainers.core.runtime import init_ray

log = logging.getLogger(__name__)


def _check_ell(ell: np.ndarray) -> np.ndarray:
    ell = np.asarray(ell, dtype=np.float64)
    if ell.ndim != 3:
        raise ValueError(f"log-ratios must be (prompts, samples, objectives), got shape {ell.shape}")
    if not np.isfinite(ell).all():
        raise ValueError("log-ratios contain non-finite values")
    return ell


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    hi = a.max(axis=axis, keepdims=True)
    return (hi + np.log(np.exp(a - hi).sum(axis=axis, keepdims=True))).squeeze(axis)


def mpo_objective(lam: Sequence[float], ell: np.ndarray) -> float:
    """``F̂(λ) = mean_x [ logsumexp_j(λ·ℓ_j) − log m ]``; ``ell (P, m, K)``, ``lam (K,)``."""
    ell = _check_ell(ell)
    s = ell @ np.asarray(lam, dtype=np.float64)  # (P, m)
    return float(np.mean(_logsumexp(s, axis=1) - math.log(ell.shape[1])))


def bsmd_direction(lam: Sequence[float], ell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(v (K,), ess (P,))``: the gradient estimate ``v_k = mean_x Σ_j a_j ℓ_jk`` with
    ``a = softmax_j(λ·ℓ_j)`` per prompt, and each prompt's effective sample size ``1 / Σ_j a_j²``."""
    ell = _check_ell(ell)
    s = ell @ np.asarray(lam, dtype=np.float64)  # (P, m)
    log_a = s - _logsumexp(s, axis=1)[:, None]
    a = np.exp(log_a)  # (P, m), rows sum to 1
    v = np.einsum("pm,pmk->k", a, ell) / ell.shape[0]
    ess = 1.0 / np.exp(_logsumexp(2 * log_a, axis=1))
    return v, ess


@dataclass
class BSMDResult:
    weights: np.ndarray  # the average iterate (1/T) Σ_t λᵗ
    last: np.ndarray  # λ^{T+1}
    history: List[Dict[str, Any]] = field(default_factory=list)  # per step: F̂, v, mean ESS, λ


def bsmd(batches: Sequence[np.ndarray], steps: Optional[int] = None, c: float = 1.0,
         seed: int = 0, log_every: int = 0) -> BSMDResult:
    """Batch stochastic mirror descent on the simplex (§3b).

    ``batches``: log-ratio arrays ``(P_b, m, K)``, one prompt batch each; step ``t`` uses batch
    ``order[t mod len(batches)]`` (a seeded shuffle per pass). ``η = c/√T``. Updates in log-space:
    ``log λ ← log λ − η v``, renormalised with logsumexp.
    """
    if not batches:
        raise ValueError("no log-ratio batches")
    K = _check_ell(batches[0]).shape[2]
    T = steps or len(batches)
    eta = c / math.sqrt(T)
    log_lam = np.full(K, -math.log(K))
    total = np.zeros(K)
    history: List[Dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    order: List[int] = []
    for t in range(T):
        if not order:
            order = list(rng.permutation(len(batches)))
        batch = batches[order.pop()]
        lam = np.exp(log_lam)
        total += lam
        v, ess = bsmd_direction(lam, batch)
        history.append({"step": t + 1, "F": mpo_objective(lam, batch), "v": v.tolist(),
                        "ess": float(ess.mean()), "lambda": lam.tolist()})
        if log_every and (t % log_every == 0 or t == T - 1):
            log.info("BSMD step %d/%d: F %.4f, E[log ratio] %s, ESS %.1f of %d, lambda %s", t + 1, T,
                     history[-1]["F"], np.round(v, 4).tolist(), ess.mean(), batch.shape[1], np.round(lam, 4).tolist())
        log_lam = log_lam - eta * v
        log_lam -= _logsumexp(log_lam, axis=0)
    return BSMDResult(weights=total / T, last=np.exp(log_lam), history=history)


class SequenceLogps:
    """``map_batches`` class: add ``logp_<name>``, the teacher-forced log-prob of every sampled
    response (JSON list) under one model; rows carry ``prompt_ids`` and ``response_ids``. The LM
    head runs on response positions only and the log-softmax in fp32, whatever the model's dtype;
    the per-sequence sums come back as float64 for the mirror descent."""

    def __init__(self, model_path: str, name: str, micro_batch_size: int = 16, threads: int = 1,
                 trust_remote_code: bool = False, placement: Optional[Placement] = None):
        torch.set_num_threads(threads)
        self.pad_id = load_tokenizer(model_path, trust_remote_code).pad_token_id
        self.model = (placement or Placement()).load(model_path, trust_remote_code)
        self.column, self.micro = f"logp_{name}", micro_batch_size

    @torch.no_grad()
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        seqs, starts, owner = [], [], []
        for row, (p, rs) in enumerate(zip(batch["prompt_ids"], batch["response_ids"])):
            prompt = json.loads(p)
            for r in json.loads(rs):
                seqs.append(prompt + r)
                starts.append(len(prompt))
                owner.append(row)
        logps = np.zeros(len(seqs))
        for i in range(0, len(seqs), self.micro):
            b = {k: t.to(self.model.device) for k, t in
                 pad_sequences(seqs[i:i + self.micro], starts[i:i + self.micro], self.pad_id).items()}
            keep = logits_needed(b["response_mask"])
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                                logits_to_keep=keep).logits
            lp = sequence_logps(logits, b["input_ids"], b["response_mask"])  # fp32 log-softmax
            logps[i:i + self.micro] = lp.double().cpu().numpy()
        per_row: List[List[float]] = [[] for _ in batch["prompt_ids"]]
        for row, lp in zip(owner, logps):
            per_row[row].append(float(lp))
        return dict(batch, **{self.column: np.array([json.dumps(v) for v in per_row], dtype=object)})


def sample_log_ratios(policies: Dict[str, str], ref: str, prompts: Sequence[str], m: int,
                      max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                      actors: int = 1, batch_size: int = 4, placement: Optional[Placement] = None) -> np.ndarray:
    """``ell (P, m, K)``: ``m`` samples per prompt from ``ref`` scored by every policy and ``ref``,
    as Ray Data stages (sampling, then one teacher-forced stage per model), each actor on
    ``placement`` (CPU fp32 by default)."""
    import ray
    import ray.data

    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    share = min(1.0, cpus / (len(policies) + 2))  # sampler and K+1 scorers stream side by side
    ds = ray.data.from_items([{"row": i, "prompt": p} for i, p in enumerate(prompts)])
    # exact samples of the reference (no top-k): the estimates of F and its gradient assume y ~ π_ref
    placement = placement or Placement()
    stages = [(Generate, (ref, m, max_new_tokens, temperature, 1.0, seed),
               {"keep_ids": True, "top_k": 0, "placement": placement})]
    stages += [(SequenceLogps, (path, name), {"placement": placement})
               for name, path in [("__ref__", ref)] + list(policies.items())]
    ds = run_stages(ds, stages, actors, placement.resources(), batch_size, num_cpus=share)
    rows = sorted(ds.take_all(), key=lambda r: r["row"])
    ref_lp = np.array([json.loads(r["logp___ref__"]) for r in rows])  # (P, m)
    return np.stack([np.array([json.loads(r[f"logp_{k}"]) for r in rows]) - ref_lp for k in policies], axis=-1)


def compute_mpo_weights(policies: Dict[str, str], ref: str, prompts: Sequence[str], out: Optional[str] = None,
                        samples_per_prompt: int = 8, prompt_batch: int = 8, steps: Optional[int] = None,
                        c: float = 1.0, max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                        actors: int = 1, force: bool = False, address: Optional[str] = None,
                        allow_rename: bool = False, placement: Optional[Placement] = None) -> Dict[str, Any]:
    """Max-min MPO weights for ``policies`` (name -> dir) around reference ``ref``; writes ``out``
    (JSON) if given. Returns the weights, F̂ at them, each objective's expected log-ratio under the
    mixture and the mean effective sample size. Checks the inputs before Ray starts (or joins
    ``address``)."""
    check_compatible(policies, ref, force=force, allow_rename=allow_rename)
    if samples_per_prompt < 2:
        raise ValueError("samples per prompt must be >= 2")
    if not prompts:
        raise ValueError("no prompts")
    init_ray(address)
    names = list(policies)
    ell = sample_log_ratios(policies, ref, prompts, samples_per_prompt, max_new_tokens, temperature, seed, actors,
                            placement=placement)
    batches = [ell[i:i + prompt_batch] for i in range(0, len(prompts), prompt_batch)]
    result = bsmd(batches, steps=steps or max(50, 10 * len(batches)), c=c, seed=seed, log_every=25)
    lam = result.weights
    v, ess = bsmd_direction(lam, ell)
    summary = {
        "weights": dict(zip(names, lam.tolist())), "objectives": names, "F": mpo_objective(lam, ell),
        "expected_log_ratio": dict(zip(names, v.tolist())), "ess_mean": float(ess.mean()),
        "samples_per_prompt": samples_per_prompt, "prompts": len(prompts), "steps": len(result.history),
        "reference": ref, "policies": policies, "history": result.history,
    }
    log.info("MPO max-min weights %s: F %.4f, expected log-ratios %s, mean ESS %.1f of %d samples",
             {k: round(w, 4) for k, w in summary["weights"].items()}, summary["F"],
             {k: round(x, 3) for k, x in summary["expected_log_ratio"].items()}, summary["ess_mean"], samples_per_prompt)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    return summary
