"""Rule-based objective scorers: ``score(prompts, responses) -> np.ndarray`` (higher is better).

- ``sentiment``: VADER compound score of the response, in [-1, 1].
- ``conciseness``: minus the number of response tokens (whitespace words when no tokenizer).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np


class SentimentScorer:
    name = "sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check(prompts, responses)
        return np.array([self._vader.polarity_scores(r)["compound"] for r in responses], dtype=np.float64)


class ConcisenessScorer:
    name = "conciseness"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def lengths(self, responses: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            return np.array([len(r.split()) for r in responses], dtype=np.float64)
        ids = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return np.array([len(x) for x in ids], dtype=np.float64)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check(prompts, responses)
        return -self.lengths(responses)


def _check(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


SCORERS: Dict[str, Callable[..., object]] = {"sentiment": SentimentScorer, "conciseness": ConcisenessScorer}


def get_scorer(name: str, tokenizer=None):
    """A scorer by objective name; unknown names raise listing the known ones."""
    if name not in SCORERS:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(SCORERS)}")
    return ConcisenessScorer(tokenizer) if name == "conciseness" else SCORERS[name]()


def score_all(names: Sequence[str], prompts: Sequence[str], responses: Sequence[str],
              tokenizer: Optional[object] = None) -> Dict[str, np.ndarray]:
    return {n: get_scorer(n, tokenizer).score(prompts, responses) for n in names}
