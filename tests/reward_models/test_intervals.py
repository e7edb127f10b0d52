"""Bootstrap intervals against known cases: constants give points, a dominating front's
difference lies above 0, pairing cancels what every method shares."""

import numpy as np
import pytest

from reward_models.evaluate import hypervolume
from reward_models.intervals import (bootstrap_indices, compare_methods, mean_interval, percentile_interval,
                                     seed_spread)

REF = (-1.0, -10.0)


def test_a_bootstrap_of_a_constant_is_a_point():
    per_prompt = np.tile([0.3, -4.0], (50, 1))
    got = mean_interval(per_prompt, bootstrap_indices(50, 200, 0))
    assert got[:, 0] == pytest.approx(got[:, 1], abs=1e-12) and got[:, 0] == pytest.approx([0.3, -4.0])
    got = compare_methods({"a": per_prompt, "b": per_prompt + [0.1, 1.0]}, {"A": ["a"], "B": ["b"]}, REF, "A")
    hv_a = hypervolume([[0.3, -4.0]], REF)
    assert got["A"]["ci95"] == pytest.approx([hv_a, hv_a]) and got["A"]["hypervolume"] == pytest.approx(hv_a)
    assert got["A"]["difference_ci95"] == [0.0, 0.0] and not got["A"]["difference_excludes_0"]
    assert got["B"]["ratio"] == pytest.approx(hypervolume([[0.4, -3.0]], REF) / hv_a)


def test_the_mean_interval_matches_the_normal_one_on_many_prompts():
    x = np.random.default_rng(1).normal(0.5, 1.0, size=(400, 1))
    lo, hi = mean_interval(x, bootstrap_indices(400, 4000, 2))[0]
    half = 1.96 * x.std(ddof=1) / 20
    assert lo == pytest.approx(x.mean() - half, abs=0.2 * half) and hi == pytest.approx(x.mean() + half, abs=0.2 * half)


def test_a_front_dominating_another_everywhere_has_a_difference_interval_above_0():
    rng = np.random.default_rng(3)
    noise = lambda: rng.normal(0, 0.3, size=(64, 2)) * [1, 2]  # noisy per prompt, as real scores are
    low = {"l1": noise() + [0.0, -6.0], "l2": noise() + [0.3, -7.0]}
    high = {"h1": low["l1"] + [0.2, 1.0], "h2": low["l2"] + [0.2, 1.0]}  # better on both, prompt by prompt
    got = compare_methods({**low, **high}, {"low": ["l1", "l2"], "high": ["h1", "h2"]}, REF, baseline="low", seed=4)
    lo, hi = got["high"]["difference_ci95"]
    assert 0 < lo <= got["high"]["difference"] <= hi and got["high"]["difference_excludes_0"]
    assert got["high"]["ratio_ci95"][0] > 1
    assert got["low"]["hypervolume"] < got["low"]["ci95"][1] and got["low"]["ci95"][0] < got["low"]["hypervolume"]


def test_pairing_cancels_what_the_methods_share():
    """Two methods a constant apart on every prompt: unpaired intervals overlap, the paired
    difference is exact."""
    base = np.random.default_rng(5).normal(0, 0.5, size=(40, 2)) + [0.0, -5.0]
    got = compare_methods({"a": base, "b": base + [0.01, 0.0]}, {"A": ["a"], "B": ["b"]}, REF, baseline="A")
    assert got["B"]["ci95"][0] < got["A"]["ci95"][1]  # overlap
    lo, hi = got["B"]["difference_ci95"]
    assert 0 < lo <= hi and got["B"]["difference_excludes_0"]
    assert hi - lo < 0.1 * (got["A"]["ci95"][1] - got["A"]["ci95"][0])


def test_policies_on_different_prompts_are_refused():
    with pytest.raises(ValueError, match="same prompts"):
        compare_methods({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, {"A": ["a"], "B": ["b"]}, REF)


def test_percentile_interval_and_seed_spread():
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval(np.array([np.nan, 1.0]), 0.5) == (1.0, 1.0)
    s = seed_spread([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0, "seeds": 3}
