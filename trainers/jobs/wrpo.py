"""``moray train wrpo``: implicit fusion of source models into a target (docs/algorithms.md §7).

Each row holds a prompt, the target's own chosen sample ``chosen`` (y_wt), its rejected sample
``rejected`` (y_l), and the best source-model response ``source`` (y_ws) -- the file that ``moray
pairs --wrpo`` writes. All three responses go through one forward and the reference pass adds
``ref_source_logps`` next to the pair's two. The loss is :func:`trainers.losses.wrpo_loss` with
``α_t = α_max · min(1, t/T)`` over optimizer steps (``T``: ``alpha_steps``, default the run's
steps), logged each step as ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from trainers.batches import pair_logps
from trainers.core.config import opt
from trainers.data import load_pairs
from trainers.job_config import Flag, Job, JobConfig
from trainers.launch import staging_dir, train_on_rows
from trainers.losses import wrpo_alpha, wrpo_loss
from trainers.task import PolicyTask, pair_stats, policy_metadata


@dataclass
class WRPOJobConfig(JobConfig):
    """`moray train wrpo`: fuse source models' chosen responses into the target policy."""

    alpha_max: float = opt(0.1, "Largest weight of the source response's reward (α_max of §7).")
    alpha_steps: int = opt(0, "Optimizer steps over which α rises linearly from 0 to alpha_max "
                           "(0: all the run's steps).")

    def extra_errors(self) -> List[str]:
        errors = []
        if not 0.0 <= self.alpha_max <= 1.0:
            errors.append(f"alpha_max must be in [0, 1], got {self.alpha_max}")
        if self.alpha_steps < 0:
            errors.append(f"alpha_steps must be >= 0, got {self.alpha_steps}")
        if self.train.loss != "dpo":
            errors.append("WRPO's loss is DPO-shaped (train.loss=dpo)")
        if self.data.objective_labels:
            errors.append("WRPO reads prompt/chosen/rejected/source rows, not objective_labels")
        return errors


class WRPOTask(PolicyTask):
    """WRPO's loss on (source, chosen, rejected) rows with the α schedule (see the module docstring)."""

    name = "wrpo"

    def __init__(self, cfg: WRPOJobConfig):
        self.cfg, self.alpha = cfg, 0.0

    def start_step(self, step: int, total_steps: int) -> None:
        self.alpha = wrpo_alpha(step, self.cfg.alpha_steps or total_steps, self.cfg.alpha_max)

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        wt, lose, ws = pair_logps(engine, batch, responses=3)
        ref = lambda k: batch[f"ref_{k}_logps"].to(wt.dtype)  # noqa: E731
        losses, chosen, rejected = wrpo_loss(ws, wt, lose, ref("source"), ref("chosen"), ref("rejected"),
                                             self.cfg.train.beta, self.alpha)
        return losses, pair_stats(chosen, rejected)  # the chosen reward is the α-weighted one

    def end_step(self) -> Dict[str, float]:
        return {"alpha": self.alpha}


def run(job: WRPOJobConfig) -> Dict[str, Any]:
    """Train one WRPO policy and export it to ``job.out``. Returns the final metrics."""
    job = job.validate()
    table, report = load_pairs(job.data, job.objective, extra=("source",), stage=staging_dir(job))  # before Ray starts
    metadata = policy_metadata(job, method="wrpo", loss="wrpo", alpha_max=job.alpha_max, alpha_steps=job.alpha_steps)
    return train_on_rows(WRPOTask, job, table, report, metadata, f"wrpo-{job.objective}")


JOB = Job("wrpo", "WRPO: fuse source models' chosen responses into the target (§7)", WRPOJobConfig, WRPOTask, run,
          flags=(Flag("--alpha-max", "alpha_max", float, help="largest source weight (default 0.1)"),
                 Flag("--alpha-steps", "alpha_steps", int, help="steps of the α ramp (default: all)")))
