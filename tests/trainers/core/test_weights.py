"""Objective weight vectors as users type them: normalised onto the simplex exactly at any
magnitude, refused with a message naming what is wrong."""

import math

import pytest

from trainers.core.weights import WeightError, check_weights

NAMES = ("sentiment", "conciseness")


def test_check_weights_normalises_and_fills_missing_names():
    assert check_weights({"sentiment": 3, "conciseness": 1}, NAMES) == (0.75, 0.25)
    assert check_weights({"conciseness": 2.0}, NAMES) == (0.0, 1.0)
    assert check_weights([1, 1], NAMES, normalize=False) == (1.0, 1.0)


@pytest.mark.parametrize("weights", [
    [1e308, 1e308, 0, 1e308], [1.7e308, 1e-300, 0, 0], [5e-324, 5e-324, 0, 0], [1e-320, 3e-320, 0, 1e-310],
    [2.2e-308, 1.0, 0, 3e-321], [10 ** 300, 10 ** 300, 10 ** 299, 0], [0.1, 0.2, 0.3, 0.4],
])
def test_check_weights_normalises_huge_and_subnormal_entries_exactly(weights):
    """Each normalised weight is the exact ratio w_i / Σw rounded to float (within 2 ulp), nothing
    overflows to inf or underflows to an all-zero vector, and the vector sums to 1."""
    from fractions import Fraction

    names = ("a", "b", "c", "d")
    got = check_weights(weights, names)
    exact = [Fraction(float(w)) / sum(Fraction(float(v)) for v in weights) for w in weights]
    for g, e in zip(got, exact):
        assert abs(g - float(e)) <= 2 * math.ulp(float(e)), (got, [float(x) for x in exact])
    assert abs(math.fsum(got) - 1) < 1e-15 and max(got) > 0


def test_check_weights_refuses_integers_beyond_float_range():
    with pytest.raises(WeightError, match="too large"):
        check_weights({"sentiment": 10 ** 400, "conciseness": 1}, NAMES)


@pytest.mark.parametrize("weights, message", [
    ({"helpful": 1.0}, "unknown objective"),
    ({"sentiment": -0.1, "conciseness": 1}, "negative"),
    ({"sentiment": float("nan")}, "not finite"),
    ({"sentiment": float("inf")}, "not finite"),
    ({"sentiment": 0, "conciseness": 0}, "all zero"),
    ({}, "all zero"),
    ([0.5, 0.3, 0.2], "3 weights for 2 objectives"),
    ({"sentiment": "a lot"}, "must be a number"),
    ({"sentiment": True}, "must be a number"),
])
def test_check_weights_refuses_bad_vectors(weights, message):
    with pytest.raises(WeightError, match=message):
        check_weights(weights, NAMES)
