"""WRPO jobs (ALGORITHMS.md §7): implicit fusion of source models into a target, on the spine's
Ray Train + DeepSpeed loop.

Each row holds a prompt, the target's own chosen sample ``chosen`` (y_wt), its rejected sample
``rejected`` (y_l), and the best source-model response ``source`` (y_ws) -- the file that
``moray pairs --wrpo`` writes. All three responses go through one forward (rows ``0..B-1``
chosen, ``B..2B-1`` rejected, ``2B..3B-1`` source) and the reference pass adds
``ref_source_logps`` next to the pair's two. The loss is :func:`trainers.losses.wrpo_loss` with
``α_t = α_max · min(1, t/T)`` over optimizer steps (``T``: ``alpha_steps``, default the run's
steps), logged each step as ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from trainers.config import DPOJobConfig, opt
from trainers.export import PolicyTask
from trainers.logps import pair_logps
from trainers.losses import wrpo_alpha, wrpo_loss


@dataclass
class WRPOJobConfig(DPOJobConfig):
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
    """The loop's task for WRPO (see the module docstring)."""

    name = "wrpo"

    def __init__(self, cfg: WRPOJobConfig):
        self.cfg, self.alpha = cfg, 0.0

    def start_step(self, step: int, total_steps: int) -> None:
        self.alpha = wrpo_alpha(step, self.cfg.alpha_steps or total_steps, self.cfg.alpha_max)

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        wt, lose, ws = pair_logps(engine, batch, responses=3)
        ref = lambda k: batch[f"ref_{k}_logps"].to(wt.dtype)  # noqa: E731
        return wrpo_loss(ws, wt, lose, ref("source"), ref("chosen"), ref("rejected"), self.cfg.train.beta, self.alpha)

    def end_step(self) -> Dict[str, float]:
        return {"alpha": self.alpha}


def run_wrpo(job: WRPOJobConfig, address: Optional[str] = None, run_name: Optional[str] = None) -> Dict[str, Any]:
    """Train one WRPO policy and export it to ``job.out``. Returns the final metrics."""
    from trainers.data import load_pairs
    from trainers.launcher import train_on_rows

    job.validate()
    table, report = load_pairs(job.data, job.objective, extra=("source",))  # before Ray starts
    metadata = {"kind": "policy", "method": "wrpo", "objective": job.objective, "loss": "wrpo",
                "alpha_max": job.alpha_max, "alpha_steps": job.alpha_steps}
    return train_on_rows("wrpo", job, table, report, metadata, run_name or f"wrpo-{job.objective}", address)
