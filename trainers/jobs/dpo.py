"""``moray train dpo``: one policy for one objective, trained with a pair loss of
:data:`trainers.losses.LOSSES` (DPO, IPO; docs/algorithms.md §1) on that objective's pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from trainers.batches import pair_logps
from trainers.data import load_pairs
from trainers.job_config import Job, JobConfig
from trainers.launch import staging_dir, train_on_rows
from trainers.losses import get_loss
from trainers.task import PolicyTask, pair_stats, policy_metadata


@dataclass
class DPOJobConfig(JobConfig):
    """`moray train dpo`: one policy for one objective."""


class DPOTask(PolicyTask):
    """Chosen and rejected through the policy in one forward; the configured pair loss against the
    reference log-probs that arrive with the rows."""

    def __init__(self, cfg: DPOJobConfig):
        self.cfg, self.loss_fn, self.name = cfg, get_loss(cfg.train.loss), cfg.train.loss

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        pc, pr = pair_logps(engine, batch)
        losses, cr, rr = self.loss_fn(pc, pr, batch["ref_chosen_logps"].to(pc.dtype),
                                      batch["ref_rejected_logps"].to(pc.dtype), self.cfg.train.beta)
        return losses, pair_stats(cr, rr)


def run(job: DPOJobConfig) -> Dict[str, Any]:
    """Train one per-objective policy and export it to ``job.out``. Returns the final metrics."""
    job = job.validate()
    table, report = load_pairs(job.data, job.objective, stage=staging_dir(job))  # fail fast: before Ray starts
    return train_on_rows(DPOTask, job, table, report, policy_metadata(job, loss=job.train.loss),
                         f"{job.train.loss}-{job.objective}")


JOB = Job("dpo", "per-objective DPO/IPO on Ray Train + DeepSpeed", DPOJobConfig, DPOTask, run)
