"""``moray eval``: policies on held-out prompts, per-objective means with confidence intervals,
the Pareto front and hypervolume of the points, and a PNG of objective space.

Every objective is maximised (conciseness is minus the token count). A policy's score on an
objective is the mean over prompts of its mean over that prompt's scored samples; the 95%
interval is ``mean ± t·sd/√n`` over prompts (prompts are the independent units; samples of one
prompt are not). Empty samples cannot be scored and are counted apart (``empty_fraction``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from reward_models import GENERATE_TOP_K
from reward_models.batch import Scorers
from reward_models.objectives import check_objectives
from reward_models.pairs import score_candidates
from reward_models.sampling import Samples, sample_responses
from trainers.core.models import Placement, load_tokenizer

log = logging.getLogger(__name__)


# -- Pareto front and hypervolume (pure) ----------------------------------------------------

def pareto_mask(points: np.ndarray) -> np.ndarray:
    """``points (N, K)``, all maximised -> ``(N,)`` bool: True where no other point dominates
    (>= on every objective and > on one). Duplicates of a front point are all on the front; a point
    with a NaN coordinate is never on it."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be (N, K), got shape {p.shape}")
    ok = np.isfinite(p).all(1)
    mask = ok.copy()
    for i in np.flatnonzero(ok):
        others = p[ok]
        dominated = ((others >= p[i]).all(1) & (others > p[i]).any(1)).any()
        mask[i] = not dominated
    return mask


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """The volume of objective space dominated by ``points (N, K)`` (maximised) and bounded below
    by ``reference (K,)``: the Lebesgue measure of ``∪_i [ref, p_i]``. Points not strictly above the
    reference on every objective add nothing; dominated and duplicate points add nothing. Exact,
    by slicing along the last objective (fine for the tens of points of a study)."""
    ref = np.asarray(reference, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64).reshape(-1, len(ref))
    p = p[np.isfinite(p).all(1) & (p > ref).all(1)]
    if len(p) == 0:
        return 0.0
    p = np.unique(p[pareto_mask(p)], axis=0)
    return float(_hv(p, ref))


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    if p.shape[1] == 1:
        return float(p[:, 0].max() - ref[0])
    order = np.argsort(-p[:, -1])  # slabs between successive last-objective levels, from the top
    p = p[order]
    total = 0.0
    for i in range(len(p)):
        low = p[i + 1, -1] if i + 1 < len(p) else ref[-1]
        height = p[i, -1] - low
        if height > 0:
            total += height * _hv(p[: i + 1, :-1], ref[:-1])
    return total


# -- scoring policies ------------------------------------------------------------------------

def t_quantile(n: int) -> float:
    """Two-sided 95% Student-t quantile for ``n`` samples (1.96 past 30)."""
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262,
             12: 2.201, 15: 2.145, 20: 2.093, 25: 2.064, 30: 2.045}
    if n < 2:
        return float("nan")
    if n > 30:
        return 1.96
    return table[max(k for k in table if k <= n)]


def summarise(scores: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """``{objective: (prompts, samples) scores, NaN = unscorable}`` -> per objective ``mean``,
    ``ci95`` (half-width over prompts), ``prompts`` (those with a scored sample)."""
    out = {}
    for k, means in per_prompt_means(scores).items():
        per_prompt = np.array([m for m in means if m is not None])
        n = len(per_prompt)
        mean = float(per_prompt.mean()) if n else float("nan")
        sd = float(per_prompt.std(ddof=1)) if n > 1 else float("nan")
        out[k] = {"mean": mean, "ci95": t_quantile(n) * sd / np.sqrt(n) if n > 1 else float("nan"), "prompts": n}
    return out


def per_prompt_means(scores: Mapping[str, np.ndarray]) -> Dict[str, List[Optional[float]]]:
    """``{objective: (prompts, samples)}`` -> each prompt's mean over its scored samples (None
    where none was scored): what a bootstrap over prompts resamples."""
    out = {}
    for k, v in scores.items():
        v = np.asarray(v, dtype=np.float64)
        ok = np.isfinite(v)
        out[k] = [float(row[m].mean()) if m.any() else None for row, m in zip(v, ok)]
    return out


@dataclass
class EvalSettings:
    samples: int = 2             # samples per prompt and policy
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    actors: int = 1
    top_k: int = GENERATE_TOP_K  # every policy and mix is sampled with it
    placement: Placement = field(default_factory=Placement)  # the sampling actors' device and dtype


def generate_for(source: Any, prompts: Sequence[str], s: EvalSettings) -> Union[List[List[str]], Samples]:
    """Samples from a policy directory (Ray Data actors), or from a callable
    ``fn(prompts, samples, settings) -> responses`` or :class:`Samples` (e.g. the serving engine
    on an MPO logits mix)."""
    if callable(source):
        return source(prompts, s.samples, s)
    return sample_responses(source, prompts, s.samples, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, seed=s.seed, actors=s.actors, top_k=s.top_k,
                            placement=s.placement)


def evaluate(policies: Mapping[str, Any], prompts: Sequence[str], objectives: Sequence[str],
             tokenizer_path: str, settings: Optional[EvalSettings] = None,
             on_policy: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> Dict[str, Dict[str, Any]]:
    """Each policy's per-objective summary on ``prompts`` (same seed for every policy), its empty
    fraction and first answer. ``policies``: name -> directory or sampling callable."""
    check_objectives(objectives)
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    s = settings or EvalSettings()
    tok = load_tokenizer(tokenizer_path)
    out: Dict[str, Dict[str, Any]] = {}
    scorers = Scorers(objectives, tokenizer_path, s.placement)  # loaded once for every policy
    try:
        _evaluate_each(policies, prompts, objectives, tok, s, scorers, on_policy, out)
    finally:
        scorers.close()
    return out


def _evaluate_each(policies, prompts, objectives, tok, s: EvalSettings, scorers: Scorers, on_policy, out) -> None:
    for name, source in policies.items():
        got = generate_for(source, prompts, s)
        responses = got.texts if isinstance(got, Samples) else got
        scores = score_candidates(objectives, prompts, responses, tok, scorers)
        empty = sum(not r.strip() for rs in responses for r in rs) / max(1, sum(len(rs) for rs in responses))
        out[name] = {"objectives": summarise(scores), "empty_fraction": empty, "example": responses[0][0],
                     "per_prompt": per_prompt_means(scores)}
        if isinstance(got, Samples):  # the engine says which answers stopped at the cap
            out[name]["capped_fraction"] = float(np.mean([c for cs in got.capped for c in cs]))
            out[name]["tokens"] = got.tokens
        if on_policy:
            on_policy(name, out[name])
        log.info("%s: %s", name, ", ".join(f"{k} {v['mean']:.3f} ± {v['ci95']:.3f}"
                                           for k, v in out[name]["objectives"].items()))


def points_of(results: Mapping[str, Mapping[str, Any]], objectives: Sequence[str]) -> np.ndarray:
    return np.array([[r["objectives"][k]["mean"] for k in objectives] for r in results.values()], dtype=np.float64)


def front_report(results: Mapping[str, Mapping[str, Any]], objectives: Sequence[str],
                 reference: Sequence[float]) -> Dict[str, Any]:
    """Which policies are on the Pareto front, and the hypervolume of all of them."""
    names = list(results)
    pts = points_of(results, objectives)
    mask = pareto_mask(pts)
    return {"front": [n for n, m in zip(names, mask) if m], "hypervolume": hypervolume(pts, reference),
            "reference": list(map(float, reference))}


def plot(results: Mapping[str, Mapping[str, Any]], objectives: Sequence[str], path: str,
         groups: Optional[Mapping[str, str]] = None, title: str = "", transform: Optional[Mapping[str, Callable]] = None,
         labels: Optional[Mapping[str, str]] = None) -> str:
    """A PNG scatter of the policies in the plane of the first two objectives with 95% intervals,
    the Pareto front drawn as a step line, points coloured by ``groups`` (name -> method).
    ``transform``/``labels`` per objective change the axes (e.g. conciseness as tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(objectives) < 2:
        raise ValueError("a plot needs two objectives")
    a, b = objectives[:2]
    tf = {k: (transform or {}).get(k, lambda v: v) for k in (a, b)}
    names = list(results)
    x = np.array([tf[a](results[n]["objectives"][a]["mean"]) for n in names])
    y = np.array([tf[b](results[n]["objectives"][b]["mean"]) for n in names])
    xe = np.array([results[n]["objectives"][a]["ci95"] for n in names])
    ye = np.array([results[n]["objectives"][b]["ci95"] for n in names])
    groups = groups or {n: n for n in names}
    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    cmap = plt.get_cmap("tab20")
    for gi, g in enumerate(dict.fromkeys(groups.get(n, n) for n in names)):
        idx = [i for i, n in enumerate(names) if groups.get(n, n) == g]
        ax.errorbar(x[idx], y[idx], xerr=np.nan_to_num(xe[idx]), yerr=np.nan_to_num(ye[idx]), fmt="o",
                    color=cmap(gi % 20), label=g, capsize=2, alpha=0.85)
    for i, n in enumerate(names):
        ax.annotate(n, (x[i], y[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    mask = pareto_mask(points_of(results, [a, b]))
    front = sorted(zip(x[mask], y[mask]))
    if front:
        fx, fy = zip(*front)
        ax.plot(fx, fy, color="black", lw=1, ls="--", label="Pareto front")
    ax.set_xlabel((labels or {}).get(a, a))
    ax.set_ylabel((labels or {}).get(b, b))
    ax.set_title(title or "policies in objective space (95% intervals over prompts)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Lay out, write as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(path: str, doc: Any) -> str:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=float)
    return path
