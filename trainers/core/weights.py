"""Objective weight vectors as users type them (serving requests, P-GAPO preferences, soups, WRPO
pair weights): checked and normalised onto the simplex."""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple


class WeightError(ValueError):
    """Invalid objective weights (the server answers 400 with this message)."""


def check_weights(weights: Mapping[str, float] | Sequence[float], names: Sequence[str],
                  normalize: bool = True) -> Tuple[float, ...]:
    """Weights in the order of ``names``; a mapping may leave objectives out (weight 0).

    Refuses unknown names, a wrong length, non-numbers, non-finite or negative weights, integers
    beyond float range and an all-zero vector. ``normalize``: scale onto the simplex (Σw = 1;
    π_ref then cancels), dividing by the largest weight first so that huge and subnormal entries
    normalise as exactly as moderate ones.
    """
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise WeightError(f"unknown objective(s) {unknown}; this server mixes {list(names)}")
        values = [weights.get(n, 0.0) for n in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise WeightError(f"{len(values)} weights for {len(names)} objectives {list(names)}")
    out = []
    for name, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WeightError(f"weight of {name!r} must be a number, got {v!r}")
        try:
            v = float(v)
        except OverflowError:  # a JSON integer beyond float range
            raise WeightError(f"weight of {name!r} is too large for a float") from None
        if not math.isfinite(v):
            raise WeightError(f"weight of {name!r} is not finite: {v}")
        if v < 0:
            raise WeightError(f"weight of {name!r} is negative: {v}")
        out.append(v)
    largest = max(out, default=0.0)
    if largest <= 0:
        raise WeightError(f"objective weights are all zero; give at least one of {list(names)} a positive weight")
    if not normalize:
        return tuple(out)
    # divide by the largest first: a plain sum overflows for huge entries (1e308 + 1e308 = inf)
    scaled = [v / largest for v in out]
    total = math.fsum(scaled)
    return tuple(v / total for v in scaled)
