"""Paired bootstrap intervals over prompts for policies' means, methods' hypervolumes and their
differences (docs/algorithms.md, "Comparing methods").

Prompts are the independent units. One set of resamples (``R`` draws of ``P`` prompt indices with
replacement) is shared by every policy and method, so a difference between two methods is taken
on the same prompts in each draw (paired) and prompt-to-prompt difficulty cancels. Intervals are
percentile intervals of the resampled statistic.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from reward_models.evaluate import hypervolume


def bootstrap_indices(prompts: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, prompts)`` prompt indices drawn with replacement (seeded)."""
    if prompts < 1 or resamples < 1:
        raise ValueError(f"need at least one prompt and one resample, got {prompts} and {resamples}")
    return np.random.default_rng(seed).integers(0, prompts, size=(resamples, prompts))


def percentile_interval(values: np.ndarray, level: float = 0.95) -> Tuple[float, float]:
    """The central ``level`` interval of ``values`` (NaNs ignored)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def resampled_means(per_prompt: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``per_prompt (P, K)`` scores (NaN: no scored sample) -> ``(R, K)`` means over each
    resample's prompts."""
    p = np.asarray(per_prompt, dtype=np.float64)
    with warnings.catch_warnings():  # a resample of only unscored prompts has no mean: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(p[index], axis=1)


def mean_interval(per_prompt: np.ndarray, index: np.ndarray, level: float = 0.95) -> np.ndarray:
    """``(K, 2)``: each column's bootstrap interval of the mean over prompts."""
    means = resampled_means(np.asarray(per_prompt, dtype=np.float64).reshape(len(per_prompt), -1), index)
    return np.array([percentile_interval(means[:, k], level) for k in range(means.shape[1])])


def hypervolume_draws(per_prompt: Mapping[str, np.ndarray], names: Sequence[str], reference: Sequence[float],
                      index: np.ndarray) -> np.ndarray:
    """``(R,)``: the hypervolume of the points of ``names`` (each policy's means over the
    resample's prompts) in each resample."""
    means = np.stack([resampled_means(per_prompt[n], index) for n in names], axis=1)  # (R, N, K)
    return np.array([hypervolume(m, reference) for m in means])


def compare_methods(per_prompt: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[str]],
                    reference: Sequence[float], baseline: Optional[str] = None, resamples: int = 1000,
                    seed: int = 0, level: float = 0.95) -> Dict[str, Dict[str, Any]]:
    """Per method (``groups``: method -> its policies; ``per_prompt``: policy -> ``(P, K)`` per-prompt
    means, every policy on the same ``P`` prompts): its hypervolume on all prompts and its
    interval; and, against ``baseline``'s, the paired difference and ratio with their intervals
    and whether the difference's interval excludes 0."""
    sizes = {len(v) for v in per_prompt.values()}
    if len(sizes) != 1:
        raise ValueError(f"every policy must be scored on the same prompts; got {sorted(sizes)} prompts")
    index = bootstrap_indices(sizes.pop(), resamples, seed)
    full = np.arange(index.shape[1])[None]
    draws = {g: hypervolume_draws(per_prompt, names, reference, index) for g, names in groups.items()}
    out: Dict[str, Dict[str, Any]] = {}
    for g, names in groups.items():
        row: Dict[str, Any] = {"hypervolume": float(hypervolume_draws(per_prompt, names, reference, full)[0]),
                               "ci95": list(percentile_interval(draws[g], level))}
        if baseline is not None:
            base = draws[baseline]
            base_hv = float(hypervolume_draws(per_prompt, groups[baseline], reference, full)[0])
            lo, hi = percentile_interval(draws[g] - base, level)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(base > 0, draws[g] / base, np.nan)
            row.update(difference=row["hypervolume"] - base_hv, difference_ci95=[lo, hi],
                       difference_excludes_0=bool(lo > 0 or hi < 0),
                       ratio=row["hypervolume"] / base_hv if base_hv > 0 else float("nan"),
                       ratio_ci95=list(percentile_interval(ratio, level)))
        out[g] = row
    return out


def seed_spread(values: Sequence[float]) -> Dict[str, float]:
    """Across training seeds: mean, sample standard deviation, min and max."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "min": float(v.min()), "max": float(v.max()), "seeds": len(v)}
