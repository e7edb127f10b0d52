"""Rule scorers and best-vs-worst pair making."""

import numpy as np
import pytest

from reward_models.pairs import best_vs_worst
from reward_models.rules import get_scorer, score_all


def test_sentiment_orders_positive_above_negative():
    s = get_scorer("sentiment").score(["p"] * 3, ["What a wonderful, lovely day!", "It is a day.", "Awful, terrible day."])
    assert s[0] > 0.5 and s[2] < -0.5 and abs(s[1]) < 0.1


def test_conciseness_is_minus_token_count(tiny_model):
    from trainers.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    resp = ["The movie was great.", "The movie was great. It felt fine."]
    s = get_scorer("conciseness", tok).score(["p", "p"], resp)
    assert list(s) == [-len(tok(r, add_special_tokens=False)["input_ids"]) for r in resp]
    assert list(get_scorer("conciseness").score(["p"], ["one two three"])) == [-3.0]


def test_unknown_objective_and_length_mismatch():
    with pytest.raises(ValueError, match="unknown objective 'humor'"):
        get_scorer("humor")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_all(["sentiment"], ["a", "b"], ["x"])


def test_best_vs_worst_drops_ties_and_keeps_margin():
    prompts = ["p1", "p2", "p3"]
    responses = [["a", "b", "c"], ["x", "y"], ["same", "same"]]
    scores = [np.array([0.1, 0.9, -0.5]), np.array([0.3, 0.3]), np.array([1.0, 0.0])]
    pairs = best_vs_worst(prompts, responses, scores)
    assert pairs == [{"prompt": "p1", "chosen": "b", "rejected": "c", "margin": pytest.approx(1.4)}]
