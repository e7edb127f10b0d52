"""GAPO / P-GAPO jobs (ALGORITHMS.md §5) on the spine's Ray Train + DeepSpeed loop, offline (online
GAPO, ``online=true``, samples and scores in ``trainers.gapo_online`` and shares this step).

Each pair carries every objective's label (a multi-objective pair file: ``data.response_columns``
+ ``data.objective_labels``, or ``pairs_multi.jsonl`` from ``moray pairs``). Per micro-batch:

1. one forward of chosen + rejected through the engine; per objective ``k`` the DPO loss in that
   objective's orientation, ``ℓ_k = −log σ(s_k · β((log π − log π_ref)(y_0) − (…)(y_1)))``;
2. the gradient of each ``L_k = mean ℓ_k`` on the balancing parameters.
   **decision**: the default set is the LM head, and its gradients are taken on a re-application
   of the head to the forward's (detached) final hidden states -- exact for the head, a matmul
   over the response positions, and outside DeepSpeed's backward hooks (DeepSpeed 0.19 runs its
   reduction epilogue after *any* backward through the engine's outputs, ``autograd.grad``
   included). ``all`` (every trainable weight; the only choice with LoRA, whose head is frozen)
   takes a second forward through the bare module for the K gradients. A head **tied** to the
   input embeddings (SmolLM2, most small models) is one matrix used twice, so its gradient has an
   embedding part that only a backward through the whole model reaches: such a head takes the
   second forward too, with the K gradients restricted to the tied matrix (its full gradient);
3. the K flattened gradients are **averaged across workers** (``all_reduce``) before the Gram
   matrix is formed, so every worker picks the same α, the α of the whole global batch;
4. ``c = gapo_coefficients(...)`` (or P-GAPO's ``λ_i/‖g_i‖``) and one ``engine.backward`` of
   ``Σ_k c_k ℓ_k`` (all trainable weights).

Under ZeRO-3 (**decision**) the head is *gathered* for step 2 (``GatheredParameters``, every
worker, released right after): one matrix, the same memory a forward's gather takes anyway.
``balance_params=all`` is refused there -- gathering every weight would undo the partitioning --
and so is a tied head, whose full gradient needs that same backward through every layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from trainers.balancing import gapo_coefficients, pgapo_coefficients
from trainers.config import DPOJobConfig, opt
from trainers.export import PolicyTask
from trainers.logps import logits_needed, sequence_logps

log = logging.getLogger(__name__)


@dataclass
class GAPOJobConfig(DPOJobConfig):
    """`moray train gapo`: one policy balancing several objectives' DPO gradients."""

    objectives: List[str] = opt([], "Objectives to balance, each with a label column in the pair file; "
                                "the first one orients chosen/rejected.")
    p: float = opt(1.0, "Gradient-norm exponent: g_i / ||g_i||^p (1: every objective normalised; 0: plain MGDA).")
    preference: Dict[str, float] = opt({}, "P-GAPO: a user preference over the objectives (normalised to "
                                       "sum 1); c_i = pref_i / ||g_i||. Empty: GAPO's MGDA weights.")
    balance_params: str = opt("head", "Parameters whose gradients are balanced: 'head' (the LM head; cheap) "
                              "or 'all' (every trainable weight; a second forward; needed with LoRA).")
    online: bool = opt(False, "Online GAPO: data.path holds prompts; each step samples from the current policy, "
                       "scores with every objective and balances policy-gradient losses.")
    samples_per_prompt: int = opt(4, "Online: samples per prompt (the leave-one-out baseline's group).")
    max_new_tokens: int = opt(48, "Online: tokens sampled per response at most.")
    temperature: float = opt(1.0, "Online: sampling temperature.")
    kl_coef: float = opt(0.05, "Online: KL penalty to the reference in the reward, r - kl_coef (log pi - log pi_ref).")
    prompt_column: str = opt("prompt", "Online: the prompt column of a jsonl/parquet/HF prompt source.")

    def validate(self) -> "GAPOJobConfig":
        """Defaults first: the policy's name joins the objectives, and a pair file without a label
        mapping is read as ``moray pairs``' ``pairs_multi.jsonl`` (response_0/1, better_<k>)."""
        if not self.objective and self.objectives:
            self.objective = "+".join(self.objectives)
        if not self.data.objective_labels and self.objectives and not self.online:
            self.data.response_columns = self.data.response_columns or ["response_0", "response_1"]
            self.data.objective_labels = {k: f"better_{k}" for k in self.objectives}
        return super().validate()

    def _tied_head(self) -> bool:
        from trainers.models import ties_embeddings

        try:
            return ties_embeddings(self.model.name_or_path, self.model.trust_remote_code)
        except (OSError, ValueError):  # no readable config here: the model load reports it
            return False

    def labelled_objectives(self) -> List[str]:
        return [] if self.online else list(self.objectives)

    def extra_errors(self) -> List[str]:
        errors = []
        if len(self.objectives) < 2 or len(set(self.objectives)) != len(self.objectives):
            errors.append(f"objectives must name at least two different objectives, got {self.objectives}")
        if self.online:
            if self.samples_per_prompt < 2 or self.max_new_tokens < 1 or not self.temperature > 0 or self.kl_coef < 0:
                errors.append("online GAPO needs samples_per_prompt >= 2, max_new_tokens >= 1, temperature > 0 "
                              "and kl_coef >= 0")
        elif not self.data.objective_labels:
            errors.append("GAPO needs per-objective labels: data.response_columns and data.objective_labels")
        if self.p < 0:
            errors.append(f"p must be >= 0, got {self.p}")
        if self.preference:
            from serving.mixing import WeightError, check_weights

            try:
                check_weights(self.preference, self.objectives)
            except WeightError as e:
                errors.append(f"preference: {e}")
        if self.balance_params not in ("head", "all"):
            errors.append(f"balance_params must be head or all, got {self.balance_params!r}")
        if self.model.lora and self.balance_params == "head":
            errors.append("with LoRA the LM head is frozen: set balance_params=all")
        if self.train.zero_stage == 3 and self.balance_params == "all":
            errors.append("under ZeRO-3 GAPO balances the LM head only (balance_params=head): gathering every "
                          "weight for K extra gradients would undo the partitioning")
        elif self.train.zero_stage == 3 and self.model.name_or_path and self._tied_head():
            errors.append(f"{self.model.name_or_path} ties its LM head to the input embeddings: the head's full "
                          "gradient needs K backward passes through the whole partitioned model, which ZeRO-3 GAPO "
                          "does not do; use train.zero_stage=2 (or lower)")
        if self.train.loss != "dpo":
            errors.append("GAPO balances DPO losses (train.loss=dpo)")
        return errors


def _gathered(params):
    """Whole parameters for the duration (ZeRO-3's ``GatheredParameters``; a no-op otherwise)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _objective_grads(losses: List[torch.Tensor], params: List[torch.Tensor]) -> torch.Tensor:
    """``(K, P)``: each objective's mean-loss gradient on ``params``, flattened (autograd.grad, so
    nothing accumulates into ``.grad``)."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        l.mean(), params, retain_graph=i < len(losses) - 1, allow_unused=True, materialize_grads=True)])
        for i, l in enumerate(losses)])


class GAPOTask(PolicyTask):
    """The loop's task for GAPO / P-GAPO (see the module docstring)."""

    def __init__(self, cfg: GAPOJobConfig):
        self.cfg, self.name = cfg, "pgapo" if cfg.preference else "gapo"
        self.preference = None
        if cfg.preference:
            from serving.mixing import check_weights

            self.preference = check_weights(cfg.preference, cfg.objectives)
        self._logged: List[Dict[str, float]] = []
        self.batch_metrics: Dict[str, float] = {}  # set by prepare (online: mean rewards)

    def objective_losses(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]):
        """Each objective's per-pair DPO loss ``(B,)`` from the policy's logits of the batch, and the
        implicit rewards ``β(log π − log π_ref)`` of chosen and rejected ``(B,)`` (first objective's
        orientation)."""
        beta = self.cfg.train.beta
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        B = logps.shape[0] // 2
        rc = beta * (logps[:B] - batch["ref_chosen_logps"].to(logps.dtype))
        rr = beta * (logps[B:] - batch["ref_rejected_logps"].to(logps.dtype))
        losses = [-F.logsigmoid((1.0 if i == 0 else batch[f"sign_{k}"].to(rc.dtype)) * (rc - rr))
                  for i, k in enumerate(self.cfg.objectives)]
        return losses, rc, rr

    def prepare(self, engine, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The micro-batch the losses are taken on (offline: the pairs as they come; online GAPO
        samples, scores and pads here)."""
        return batch

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        import torch.distributed as dist

        cfg = self.cfg
        batch = self.prepare(engine, batch)
        keep = logits_needed(batch["response_mask"])
        module = engine.module
        head = module.get_output_embeddings() if cfg.balance_params == "head" else None
        tied = head is not None and head.weight is module.get_input_embeddings().weight
        head_only = head is not None and not tied
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                     logits_to_keep=keep, output_hidden_states=head_only)
        per_pair, rc, rr = self.objective_losses(out.logits, batch)
        if head_only:  # the head on the detached final hidden states: exact head gradients, no DeepSpeed hooks
            params = [p for p in head.parameters() if p.requires_grad]
            hidden = out.hidden_states[-1][:, -keep:].detach()
            # ZeRO-3: every worker gathers the (partitioned) head for these K gradients, then lets it go;
            # F.linear, not head(...), so ZeRO-3's module hooks do not release it mid-way. Stages 0-2: no-op.
            with _gathered(params):
                side = self.objective_losses(F.linear(hidden, head.weight, head.bias), batch)[0]
                grads = _objective_grads(side, params)
        else:  # a second forward through the bare module: every weight, or the tied head's full gradient
            params = [p for p in (head if head is not None else module).parameters() if p.requires_grad]
            side = self.objective_losses(module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False, logits_to_keep=keep).logits, batch)[0]
            grads = _objective_grads(side, params)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grads)  # each objective's average gradient over the global batch
            grads /= dist.get_world_size()
        bal = (pgapo_coefficients(grads, self.preference) if self.preference
               else gapo_coefficients(grads, p=cfg.p))
        c = bal.coefficients.to(per_pair[0].dtype)
        combined = sum(c[i] * per_pair[i] for i in range(len(per_pair)))
        entry = bal.log(cfg.objectives)
        entry.update({f"loss/{k}": float(l.detach().mean()) for k, l in zip(cfg.objectives, per_pair)})
        if not cfg.online:  # each objective's margin and accuracy in its own orientation
            margin = (rc - rr).detach()
            for i, k in enumerate(cfg.objectives):
                m = margin if i == 0 else margin * batch[f"sign_{k}"].to(margin.dtype)
                entry.update({f"margin/{k}": float(m.mean()), f"accuracy/{k}": float((m > 0).float().mean())})
        entry.update(self.batch_metrics)
        self._logged.append(entry)
        return combined, rc.detach(), rr.detach()

    def end_step(self) -> Dict[str, float]:
        """Means over the micro-batches since the last optimizer step (α, gradient norms, cosine,
        per-objective losses); identical on every worker for α (the gradients were averaged)."""
        if not self._logged:
            return {}
        out = {k: sum(e[k] for e in self._logged) / len(self._logged) for k in self._logged[0]}
        self._logged = []
        return out


def run_gapo(job: GAPOJobConfig, address: Optional[str] = None, run_name: Optional[str] = None) -> Dict[str, Any]:
    """Train one GAPO / P-GAPO policy and export it to ``job.out``. Returns the final metrics."""
    from trainers.data import load_pairs
    from trainers.launcher import train_on_rows

    job.validate()
    if job.online:
        from trainers.gapo_online import run_online_gapo

        return run_online_gapo(job, address, run_name)
    table, report = load_pairs(job.data, job.objectives[0], also=job.objectives[1:])  # before Ray starts
    metadata = {"kind": "policy", "method": "pgapo" if job.preference else "gapo", "objective": job.objective,
                "objectives": job.objectives, "preference": job.preference, "p": job.p,
                "balance_params": job.balance_params, "loss": "dpo"}
    return train_on_rows("gapo", job, table, report, metadata, run_name or f"gapo-{job.objective}", address)
