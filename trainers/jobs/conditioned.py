"""``moray train conditioned``: one preference-conditioned policy for every trade-off
(docs/algorithms.md §9). Each adapted layer holds one LoRA pair per objective, scaled by the row's
``λ``, and an optional shared pair (:mod:`trainers.conditioned_lora`); each row draws its own ``λ``
from a generator seeded by ``(seed, row id)`` (``dirichlet``), or trains exactly one objective's
pair (``vertices``: K per-objective LoRA policies from one job on one base); the loss is
:func:`trainers.losses.conditioned_loss` against the base's log-probs (the reference pass runs
with every adapter off).

The rows are GAPO's: pairs labelled by every objective (``data.response_columns`` +
``data.objective_labels``, or ``moray pairs``' ``pairs_multi.jsonl``). The export is the base as
an HF checkpoint (``moray.json`` kind ``conditioned``) and ``vertices/<objective>/``, one peft
adapter per objective holding ``[A_0; A_k]``, ``[B_0, B_k]``: the policy at ``λ`` is their LoRA soup.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from trainers.batches import pair_logps
from trainers.conditioned_lora import (SAMPLINGS, Preference, install, is_adapter_tensor, row_preferences, set_preference,
                                       token_preferences, vertex_factors)
from trainers.core import storage
from trainers.core.config import opt
from trainers.core.export import VERTICES_DIR, parse_size
from trainers.core.metadata import PolicyMetadata, write_metadata
from trainers.core.models import load_tokenizer
from trainers.data import load_pairs
from trainers.deepspeed_setup import load_placement
from trainers.job_config import Flag, Job, JobConfig, multi_objective, objectives_errors, one_of
from trainers.launch import staging_dir, train_on_rows
from trainers.losses import conditioned_loss
from trainers.policy_export import export_model
from trainers.task import PolicyTask, build_policy, pair_stats


@dataclass
class ConditionedJobConfig(JobConfig):
    """`moray train conditioned`: one policy conditioned on the objective weights."""

    objectives: List[str] = opt([], "Objectives, each with a label column in the pair file; their order is the "
                                "order of λ (the first one orients chosen/rejected).")
    rank: int = opt(8, "LoRA rank of each objective's pair (A_k, B_k); the scale is model.lora_alpha / rank.")
    shared_rank: int = opt(0, "Rank of the shared pair (A_0, B_0), on for every λ (0: none).")
    concentration: float = opt(1.0, "Dirichlet concentration a of each row's λ ~ Dirichlet(a·1_K) (1: uniform on "
                               "the simplex).")
    sampling: str = opt("dirichlet", "How each row's λ is drawn: dirichlet, or vertices (each row trains exactly "
                        "one objective's pair: K per-objective LoRA policies from one job).")

    def resolved(self) -> "ConditionedJobConfig":
        return multi_objective(self, self.objectives)

    def labelled_objectives(self) -> List[str]:
        return list(self.objectives)

    def extra_errors(self) -> List[str]:
        errors = objectives_errors(self.objectives)
        if not self.data.objective_labels:
            errors.append("the conditioned policy needs per-objective labels: data.response_columns and "
                          "data.objective_labels")
        if self.rank < 1 or self.shared_rank < 0:
            errors.append(f"rank must be >= 1 and shared_rank >= 0, got {self.rank} and {self.shared_rank}")
        if not (self.concentration > 0 and math.isfinite(self.concentration)):
            errors.append(f"concentration must be a positive finite number, got {self.concentration}")
        if self.sampling not in SAMPLINGS:
            errors.append(f"sampling must be {one_of(SAMPLINGS)}, got {self.sampling!r}")
        if self.model.lora:
            errors.append("the conditioned policy trains its own per-objective adapters: drop model.lora (--lora)")
        if self.train.loss != "dpo":
            errors.append("the conditioned policy trains λ-weighted DPO losses (train.loss=dpo)")
        return errors

    @property
    def scaling(self) -> float:
        return self.model.lora_alpha / self.rank


class ConditionedTask(PolicyTask):
    """The λ-weighted per-objective DPO losses of rows each with its own λ (module docstring)."""

    name = "conditioned"

    def __init__(self, cfg: ConditionedJobConfig):
        self.cfg, self.K = cfg, len(cfg.objectives)
        self.step_sums: Optional[torch.Tensor] = None  # this step's Σλ per objective and its rows, this worker
        self.seen = [0.0] * (self.K + 1)  # Σλ per objective and rows over the whole run, every worker
        self.preference: Optional[Preference] = None  # the λ the model's adapters read

    def build(self) -> torch.nn.Module:
        """The base (frozen) with the conditioned adapters on ``model.lora_target_modules``."""
        c, m = self.cfg, self.cfg.model
        model = build_policy(dataclasses.replace(m, lora=False), *load_placement(c.train))
        install(model, self.K, c.rank, c.shared_rank, m.lora_alpha, m.lora_target_modules, m.lora_dropout)
        return model

    def collate(self, rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
        """The micro-batch with each row's λ (``preference`` ``(B, K)``), a function of its row id."""
        batch = super().collate(rows, pad_id, index)
        c = self.cfg
        batch["preference"] = torch.from_numpy(row_preferences(
            [rows["idx"][i] for i in index], c.train.seed, self.K, c.concentration, c.sampling))
        return batch

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        lam = batch["preference"]
        # λ stays set until the step ends: a checkpointed layer recomputes its forward in backward
        set_preference(engine, token_preferences(batch, lam.float()))
        self.preference = engine.module.moray_preference
        pc, pr = pair_logps(engine, batch)
        lam = lam.to(pc.dtype)
        signs = torch.stack([torch.ones_like(pc) if i == 0 else batch[f"sign_{k}"].to(pc.dtype)
                             for i, k in enumerate(self.cfg.objectives)], 1)
        losses, c, r = conditioned_loss(pc, pr, batch["ref_chosen_logps"].to(pc.dtype),
                                        batch["ref_rejected_logps"].to(pc.dtype), signs, lam, self.cfg.train.beta)
        stats = pair_stats(c, r)
        for i, k in enumerate(self.cfg.objectives):
            stats[f"lambda/{k}"] = lam[:, i].detach()
            stats[f"accuracy/{k}"] = (signs[:, i] * (c - r) > 0).to(c.dtype)
        drawn = batch["preference"].double()  # the drawn λ, float64: its sums are checked across a resume
        sums = torch.cat([drawn.sum(0), drawn.new_tensor([drawn.shape[0]])])
        self.step_sums = sums if self.step_sums is None else self.step_sums + sums
        return losses, stats

    def end_step(self) -> Dict[str, float]:
        """Adapters off between steps (the loop's probes see the base); ``lambda_seen/<k>``: Σλ over
        every row trained so far, all workers (kept in checkpoints: equal after a resume)."""
        import torch.distributed as dist

        if self.preference is not None:
            self.preference.weights = None
        if self.step_sums is None:
            return {}
        sums = self.step_sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        self.seen = [a + b for a, b in zip(self.seen, sums.cpu().tolist())]
        self.step_sums = None
        return {**{f"lambda_seen/{k}": self.seen[i] for i, k in enumerate(self.cfg.objectives)},
                "rows_seen": self.seen[-1]}

    def state(self) -> Dict[str, Any]:
        return {"seen": self.seen}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.seen = list(state.get("seen", self.seen))

    def export(self, tensors, module: torch.nn.Module, out_dir: str, metadata: PolicyMetadata,
               dtype: torch.dtype) -> None:
        """The base as an HF checkpoint in ``out_dir``, then ``vertices/<objective>/``:
        each a peft adapter of ``[A_0; A_k]``, ``[B_0, B_k]`` whose scale is ``s``."""
        m = self.cfg.model
        set_preference(module, None)
        kept: Dict[str, torch.Tensor] = {}
        export_model(tensors, module, load_tokenizer(m.name_or_path, m.trust_remote_code), out_dir, metadata, dtype,
                     parse_size(m.export_shard_size), aside=is_adapter_tensor, kept=kept)
        write_vertices(kept, out_dir, metadata, self.cfg)


def write_vertices(kept: Dict[str, torch.Tensor], out_dir: str, metadata: PolicyMetadata,
                   cfg: ConditionedJobConfig) -> None:
    """``out_dir/vertices/<k>/``: objective ``k``'s vertex ``W + s(B_0A_0 + B_kA_k)`` as one peft
    LoRA (rank ``r0 + r``, ``lora_alpha = s·(r0 + r)``), with its ``moray.json`` (kind policy)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, t in kept.items():
        layer, part = name.rsplit(".", 1)
        layers.setdefault(layer.removesuffix(".conditioned"), {})[part] = t
    r = cfg.shared_rank + cfg.rank
    for i, k in enumerate(cfg.objectives):
        where = storage.join(out_dir, VERTICES_DIR, k)
        factors = vertex_factors(layers, i, cfg.rank)
        with storage.writing_dir(where) as local:
            save_file({f"base_model.model.{n}.lora_{p}.weight": t.contiguous()
                       for n, (A, B) in factors.items() for p, t in (("A", A), ("B", B))},
                      str(Path(local) / "adapter_model.safetensors"), metadata={"format": "pt"})
            LoraConfig(r=r, lora_alpha=cfg.scaling * r, target_modules=list(cfg.model.lora_target_modules),
                       lora_dropout=0.0, use_rslora=False, task_type="CAUSAL_LM",
                       base_model_name_or_path=cfg.model.name_or_path).save_pretrained(local)
        write_metadata(where, PolicyMetadata("policy", k, metadata.reference_model, metadata.beta, {
            **metadata.entries, "method": "conditioned", "lora": True, "lora_merged": False, "base": "../.."}))


def conditioned_metadata(job: ConditionedJobConfig) -> PolicyMetadata:
    """The export's ``moray.json``: kind conditioned, its objectives in λ's order and its adapters."""
    m = job.model
    return PolicyMetadata("conditioned", None, m.name_or_path, job.train.beta, {
        "method": "conditioned", "loss": "dpo", "objectives": list(job.objectives), "lora_r": job.rank,
        "shared_r": job.shared_rank, "lora_alpha": m.lora_alpha, "concentration": job.concentration,
        "sampling": job.sampling, "target_modules": list(m.lora_target_modules)})


def run(job: ConditionedJobConfig) -> Dict[str, Any]:
    """Train one conditioned policy and export it to ``job.out``. Returns the final metrics. The
    config and every row are checked before Ray starts."""
    job = job.validate()
    table, report = load_pairs(job.data, job.objectives[0], also=job.objectives[1:], stage=staging_dir(job))
    return train_on_rows(ConditionedTask, job, table, report, conditioned_metadata(job),
                         f"conditioned-{job.objective}")


JOB = Job("conditioned", "one policy conditioned on the objective weights (per-objective LoRA pairs)",
          ConditionedJobConfig, ConditionedTask, run, flags=(
              Flag("--objectives", "objectives", help="objectives, each labelled in the pair file (λ's order)"),
              Flag("--rank", "rank", int, help="LoRA rank per objective"),
              Flag("--shared-rank", "shared_rank", int, help="rank of the shared pair (0: none)"),
              Flag("--concentration", "concentration", float, help="Dirichlet concentration of λ (default 1)"),
              Flag("--sampling", "sampling", choices=tuple(SAMPLINGS)),
          ))
