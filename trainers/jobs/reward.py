"""``moray train reward``: a learned Bradley–Terry reward model for one objective (docs/algorithms.md
§2), on the same Ray Train + DeepSpeed loop as the policies.

A share of the pairs (``eval_fraction``) is held out; the pairwise accuracy on it goes into the
model's ``moray.json``, and the exported directory then works as an objective name
(:class:`reward_models.learned.LearnedScorer`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch

from reward_models.learned import DEFAULT_BACKBONE, LearnedScorer, encode, load_reward_model, resolve_backbone
from trainers.batches import pad_pairs
from trainers.core import storage
from trainers.core.config import opt
from trainers.core.metadata import PolicyMetadata, read_metadata, write_metadata
from trainers.core.models import load_tokenizer
from trainers.data import load_pairs
from trainers.job_config import Flag, Job, JobConfig, ModelConfig
from trainers.launch import train_on_rows
from trainers.losses import bt_loss
from trainers.task import Task, pair_stats

log = logging.getLogger(__name__)


@dataclass
class RewardJobConfig(JobConfig):
    """`moray train reward`: a Bradley–Terry reward model for one objective. ``model.name_or_path``
    is the backbone (``minilm`` = the offline all-MiniLM-L6-v2); ``train.loss``/``beta`` are unused."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path=DEFAULT_BACKBONE))
    eval_fraction: float = opt(0.1, "Fraction of pairs held out to measure pairwise accuracy.")

    def resolved(self) -> "RewardJobConfig":
        """The backbone's name resolved to a path (``minilm``: the offline MiniLM)."""
        return dataclasses.replace(self, model=dataclasses.replace(
            self.model, name_or_path=resolve_backbone(self.model.name_or_path)))

    def extra_errors(self) -> List[str]:
        errors = []
        if not 0.0 <= self.eval_fraction < 1.0:
            errors.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.model.lora:
            errors.append("LoRA is not supported for reward models")
        return errors


class TokenizeReward:
    """``map_batches`` class: pairs -> ``chosen_ids``/``rejected_ids`` of (prompt, response) encodings."""

    def __init__(self, path: str, max_prompt_length: int, max_response_length: int, trust_remote_code: bool = False):
        self.tok = load_tokenizer(path, trust_remote_code)
        self.max_length = max_prompt_length + max_response_length

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        if any(batch["is_chat"]):
            raise ValueError("reward models take plain-string prompts and responses")
        n = len(batch["idx"])
        out: Dict[str, Any] = {"idx": batch["idx"]}
        for k in ("chosen", "rejected"):
            arr = np.empty(n, dtype=object)
            arr[:] = encode(self.tok, batch["prompt"], batch[k], self.max_length)
            out[f"{k}_ids"] = arr
            out[f"{k}_start"] = np.zeros(n, dtype=np.int64)
        return out


class RewardTask(Task):
    """Scores of chosen and rejected in one forward; the Bradley–Terry loss. Its statistics are the
    pair statistics of the scores (``accuracy``: the chosen response scored higher)."""

    name = "bt"

    def __init__(self, cfg: RewardJobConfig):
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        return load_reward_model(self.cfg.model.name_or_path, self.cfg.model.trust_remote_code)[0]

    def collate(self, rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
        return pad_pairs(rows, pad_id, index)

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        # the loss in fp32 whatever the training precision
        scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
        B = scores.shape[0] // 2
        c, r = scores[:B], scores[B:]
        return bt_loss(c, r), pair_stats(c, r)


def run(job: RewardJobConfig) -> Dict[str, Any]:
    """Train a reward model on Ray Train + DeepSpeed; export it with its held-out accuracy."""
    backbone = job.model.name_or_path
    job = job.validate()
    table, report = load_pairs(job.data, job.objective)
    perm = np.random.default_rng(job.train.seed).permutation(table.num_rows)
    n_eval = int(round(job.eval_fraction * table.num_rows))
    held_out, train = table.take(np.sort(perm[:n_eval])), table.take(np.sort(perm[n_eval:]))
    report.kept = train.num_rows
    metadata = PolicyMetadata("reward_model", job.objective, entries={"backbone": backbone, "held_out_pairs": n_eval})
    metrics = train_on_rows(RewardTask, job, train, report, metadata, f"reward-{job.objective}",
                            tokenize=TokenizeReward)
    if n_eval:
        with storage.local_dir(job.out) as local:
            scorer = LearnedScorer(local)
        prompts = held_out.column("prompt").to_pylist()
        sc = scorer.score(prompts, held_out.column("chosen").to_pylist())
        sr = scorer.score(prompts, held_out.column("rejected").to_pylist())
        metrics["held_out_accuracy"] = float((sc > sr).mean())
        write_metadata(job.out, read_metadata(job.out).with_entries(held_out_accuracy=metrics["held_out_accuracy"]))
    log.info("trained a reward model for %r on %d pairs; held-out pairwise accuracy %s; exported to %s",
             job.objective, metrics["pairs"], f"{metrics.get('held_out_accuracy', float('nan')):.3f}", job.out)
    return metrics


JOB = Job("reward", "Bradley-Terry reward model on Ray Train + DeepSpeed", RewardJobConfig, RewardTask, run, flags=(
    Flag("--backbone", "model.name_or_path", help="HF name or path, or 'minilm' (offline, default)"),
    Flag("--eval-fraction", "eval_fraction", float, help="pairs held out for accuracy"),
))
