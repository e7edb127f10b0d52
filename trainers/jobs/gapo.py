"""``moray train gapo``: GAPO / P-GAPO (docs/algorithms.md §5), one policy balancing several
objectives' gradients; offline on pairs labelled by every objective, or online (``--online``) on
samples of the current policy.

Offline, each pair carries every objective's label (``data.response_columns`` +
``data.objective_labels``, or ``pairs_multi.jsonl`` from ``moray pairs``). Per micro-batch:

1. one forward of chosen + rejected through the engine; per objective ``k`` the DPO loss in that
   objective's orientation (chosen and rejected swapped where it prefers the other response);
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
3. the Gram matrix is that of the K gradients **averaged across workers**, so every worker picks
   the same α, the α of the whole global batch; no worker holds the averaged gradients: each sums
   one slice of them and only the K×K partial Grams go through ``all_reduce``
   (:func:`trainers.balancing.averaged_gram`);
4. ``c = gapo_coefficients(...)`` (or P-GAPO's ``λ_i/‖g_i‖``) and one ``engine.backward`` of
   ``Σ_k c_k ℓ_k`` (all trainable weights).

Under ZeRO-3 (**decision**) the head is *gathered* for step 2 (``GatheredParameters``, every
worker, released right after). ``balance_params=all`` is refused there -- gathering every weight
would undo the partitioning -- and so is a tied head, whose full gradient needs that same
backward through every layer. ``balance_params=all`` on full weights holds K full-model gradients
(2K x 14 GB at 7B in bf16): it is refused before training above ``balance_memory_gb``, with the estimate.

Online (:class:`OnlineGAPOTask`), rows are prompts and each micro-batch is a rollout
(:class:`trainers.rollout.Rollout`); objective ``k``'s loss is
:func:`trainers.losses.policy_gradient_loss` of its scores (REINFORCE with a leave-one-out
baseline and a KL penalty to the reference), balanced by the same step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from reward_models.objectives import check_objectives, objectives_help
from reward_models.prompts import load_prompts
from trainers.balancing import averaged_gram, gapo_from_gram, gram_of, pgapo_from_gram
from trainers.batches import batch_logits_to_keep, pad_pairs
from trainers.core.config import opt, parse_numbers
from trainers.core.logps import response_logits, sequence_logps
from trainers.core.models import count_parameters, ties_embeddings
from trainers.core.weights import WeightError, check_weights
from trainers.data import LoadReport, load_pairs
from trainers.deepspeed_setup import use_bf16
from trainers.job_config import Flag, Job, JobConfig, multi_objective, objectives_errors
from trainers.launch import staging_dir, train_on_rows
from trainers.losses import dpo_loss, policy_gradient_loss
from trainers.rollout import Rollout, TokenizePrompts, pad_prompts
from trainers.task import PolicyTask, pair_stats, policy_metadata

log = logging.getLogger(__name__)


@dataclass
class GAPOJobConfig(JobConfig):
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
    balance_memory_gb: float = opt(8.0, "balance_params=all on full weights: most GiB the K per-objective "
                                   "gradients may take on each worker, estimated (K+1) x parameters x bytes "
                                   "before training; above it the job is refused (use head, or LoRA).")

    def resolved(self) -> "GAPOJobConfig":
        """The policy's name joins the objectives, and a pair file without a label mapping is read as
        ``moray pairs``' ``pairs_multi.jsonl`` (response_0/1, better_<k>)."""
        out = multi_objective(self, [] if self.online else self.objectives)
        if not out.objective and self.objectives:
            out.objective = "+".join(self.objectives)
        return out

    def _tied_head(self) -> bool:
        try:
            return ties_embeddings(self.model.name_or_path, self.model.trust_remote_code)
        except (OSError, ValueError):  # no readable config here: the model load reports it
            return False

    def balance_memory(self) -> int:
        """Bytes the K gradients of ``balance_params=all`` on full weights take on a worker at their
        peak (:func:`_objective_grads`): K rows of every parameter, plus one objective's gradients
        as autograd returns them, in the training dtype."""
        params = count_parameters(self.model.name_or_path, self.model.trust_remote_code)
        return (len(self.objectives) + 1) * params * (2 if use_bf16(self.train, self.train.use_gpu) else 4)

    def _balance_memory_errors(self) -> List[str]:
        try:
            need = self.balance_memory()
        except (OSError, ValueError):  # no readable config here: the model load reports it
            return []
        if need <= self.balance_memory_gb * 2**30:
            return []
        return [f"balance_params=all on full weights holds {len(self.objectives)} full-model gradients at once: about "
                f"{need / 2**30:.1f} GiB per worker for {self.model.name_or_path}, above balance_memory_gb="
                f"{self.balance_memory_gb:g}; use balance_params=head, LoRA (model.lora), or raise balance_memory_gb "
                "if the workers have that memory free"]

    def labelled_objectives(self) -> List[str]:
        return [] if self.online else list(self.objectives)

    def extra_errors(self) -> List[str]:
        errors = objectives_errors(self.objectives)
        if self.online:
            if self.samples_per_prompt < 2 or self.max_new_tokens < 1 or not self.temperature > 0 or self.kl_coef < 0:
                errors.append("online GAPO needs samples_per_prompt >= 2, max_new_tokens >= 1, temperature > 0 "
                              "and kl_coef >= 0")
        elif not self.data.objective_labels:
            errors.append("GAPO needs per-objective labels: data.response_columns and data.objective_labels")
        if self.p < 0:
            errors.append(f"p must be >= 0, got {self.p}")
        if self.preference:
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
        if self.balance_params == "all" and not self.model.lora and self.model.name_or_path:
            errors += self._balance_memory_errors()
        if self.train.loss != "dpo":
            errors.append("GAPO balances DPO losses (train.loss=dpo)")
        return errors


def _gathered(params):
    """Whole parameters for the duration (ZeRO-3's ``GatheredParameters``; a no-op otherwise)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _objective_grads(losses: List[torch.Tensor], params: List[torch.Tensor]) -> torch.Tensor:
    """``(K, P)``: each objective's mean-loss gradient on ``params``, flattened (autograd.grad, so
    nothing accumulates into ``.grad``), each written straight into its row: K rows plus one
    objective's gradients at a time (:meth:`GAPOJobConfig.balance_memory`)."""
    out = None
    for i, l in enumerate(losses):
        grads = torch.autograd.grad(l.mean(), params, retain_graph=i < len(losses) - 1, allow_unused=True,
                                    materialize_grads=True)
        if out is None:
            out = grads[0].new_empty(len(losses), sum(g.numel() for g in grads))
        torch.cat([g.reshape(-1) for g in grads], out=out[i])
        del grads
    return out


class GAPOTask(PolicyTask):
    """GAPO / P-GAPO on labelled pairs (see the module docstring)."""

    def __init__(self, cfg: GAPOJobConfig):
        self.cfg, self.name = cfg, "pgapo" if cfg.preference else "gapo"
        self.preference = check_weights(cfg.preference, cfg.objectives) if cfg.preference else None
        self._logged: List[Dict[str, Any]] = []  # per micro-batch: floats, or 0-d tensors on the device
        self.batch_metrics: Dict[str, float] = {}  # set by prepare (online: the rollout's)

    def objective_losses(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]):
        """Each objective's per-row loss ``(B,)`` from the policy's logits of the batch, and the
        statistics the task reports: here the pair statistics in the first objective's orientation."""
        beta = self.cfg.train.beta
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        B = logps.shape[0] // 2
        pc, pr = logps[:B], logps[B:]
        rc, rr = batch["ref_chosen_logps"].to(logps.dtype), batch["ref_rejected_logps"].to(logps.dtype)
        losses, chosen, rejected = [], None, None
        for i, k in enumerate(self.cfg.objectives):
            same = torch.ones_like(pc, dtype=torch.bool) if i == 0 else batch[f"sign_{k}"] > 0
            flip = lambda a, b: torch.where(same, a, b)  # noqa: E731  (this objective prefers the other response)
            loss, c, r = dpo_loss(flip(pc, pr), flip(pr, pc), flip(rc, rr), flip(rr, rc), beta)
            losses.append(loss)
            if i == 0:
                chosen, rejected = c, r
        return losses, pair_stats(chosen, rejected)

    def collate(self, rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
        """Right-padded rows: the balancing gradients re-apply the head to the forward's hidden states."""
        return pad_pairs(rows, pad_id, index)

    def prepare(self, engine, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The micro-batch the losses are taken on (offline: the pairs as they come)."""
        return batch

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        import torch.distributed as dist

        cfg = self.cfg
        batch = self.prepare(engine, batch)
        keep = batch_logits_to_keep(batch)
        module = engine.module
        head = module.get_output_embeddings() if cfg.balance_params == "head" else None
        tied = head is not None and head.weight is module.get_input_embeddings().weight
        head_only = head is not None and not tied
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, hidden = response_logits(engine, keep, **inputs)  # the head in float32
        per_row, stats = self.objective_losses(logits, batch)
        if head_only:  # the head on the detached final hidden states: exact head gradients, no DeepSpeed hooks
            params = [p for p in head.parameters() if p.requires_grad]
            hidden = hidden.detach().to(logits.dtype)
            # ZeRO-3: every worker gathers the (partitioned) head for these K gradients, then lets it go;
            # F.linear, not head(...), so ZeRO-3's module hooks do not release it mid-way. Stages 0-2: no-op.
            with _gathered(params):
                bias = None if head.bias is None else head.bias.to(logits.dtype)
                side = self.objective_losses(F.linear(hidden, head.weight.to(logits.dtype), bias), batch)[0]
                grads = _objective_grads(side, params)
        else:  # a second forward through the bare module: every weight, or the tied head's full gradient
            params = [p for p in (head if head is not None else module).parameters() if p.requires_grad]
            side = self.objective_losses(response_logits(module, keep, **inputs)[0], batch)[0]
            grads = _objective_grads(side, params)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        gram = averaged_gram(grads) if distributed else gram_of(grads)  # of the global batch's gradients
        bal = (pgapo_from_gram(gram, self.preference, device=grads.device) if self.preference
               else gapo_from_gram(gram, p=cfg.p, device=grads.device))
        c = bal.coefficients.to(per_row[0].dtype)
        combined = sum(c[i] * per_row[i] for i in range(len(per_row)))
        entry: Dict[str, Any] = bal.log(cfg.objectives)
        entry.update({f"loss/{k}": l.detach().mean() for k, l in zip(cfg.objectives, per_row)})
        if not cfg.online:  # each objective's margin and accuracy in its own orientation
            margin = stats["reward_margin"]
            for i, k in enumerate(cfg.objectives):
                m = margin if i == 0 else margin * batch[f"sign_{k}"].to(margin.dtype)
                entry.update({f"margin/{k}": m.mean(), f"accuracy/{k}": (m > 0).to(m.dtype).mean()})
        entry.update(self.batch_metrics)
        self._logged.append(entry)
        return combined, stats

    def end_step(self) -> Dict[str, float]:
        """Means over the micro-batches since the last optimizer step (α, gradient norms, cosine,
        per-objective losses); identical on every worker for α (the gradients were averaged)."""
        if not self._logged:
            return {}
        means = {k: sum(e[k] for e in self._logged) / len(self._logged) for k in self._logged[0]}
        self._logged = []
        on_device = [k for k, v in means.items() if isinstance(v, torch.Tensor)]
        if on_device:  # one copy to the host for all of them
            means.update(zip(on_device, torch.stack([means[k].double() for k in on_device]).cpu().tolist()))
        return {k: float(v) for k, v in means.items()}


class OnlineGAPOTask(GAPOTask):
    """Online GAPO: rollouts of the current policy, per-objective policy-gradient losses (the
    reference is the rollout's own frozen copy)."""

    needs_reference = False

    def __init__(self, cfg: GAPOJobConfig):
        super().__init__(cfg)
        self.name = "online-" + self.name

    def build(self) -> torch.nn.Module:
        c = self.cfg
        self.rollout = Rollout(c.model, c.train, c.objectives, c.samples_per_prompt, c.max_new_tokens, c.temperature)
        return super().build()

    def collate(self, rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
        return pad_prompts(rows, pad_id, index)

    def prepare(self, engine, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = self.rollout(engine.module, batch)
        self.batch_metrics = out.pop("metrics")
        return out

    def objective_losses(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]):
        """Each objective's per-sample policy-gradient loss ``(B·n,)``; the statistic ``kl``, each
        sample's ``log π_θ − log π_ref`` (its mean estimates the KL to the reference)."""
        n = self.cfg.samples_per_prompt
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        ref = batch["ref_logps"].to(logps.dtype)
        losses = [policy_gradient_loss(logps.view(-1, n), batch[f"reward_{k}"].to(logps.dtype).view(-1, n),
                                       ref.view(-1, n), self.cfg.kl_coef).reshape(-1)
                  for k in self.cfg.objectives]
        return losses, {"kl": (logps - ref).detach()}


def make_task(cfg: GAPOJobConfig) -> GAPOTask:
    return OnlineGAPOTask(cfg) if cfg.online else GAPOTask(cfg)


def run(job: GAPOJobConfig) -> Dict[str, Any]:
    """Train one GAPO / P-GAPO policy (offline or online) and export it to ``job.out``. Returns the
    final metrics. Rows and objectives are checked before Ray starts."""
    job = job.validate()
    method = "pgapo" if job.preference else "gapo"
    common = dict(objectives=job.objectives, preference=job.preference, p=job.p, balance_params=job.balance_params)
    if not job.online:
        table, report = load_pairs(job.data, job.objectives[0], also=job.objectives[1:], stage=staging_dir(job))
        return train_on_rows(make_task, job, table, report, policy_metadata(job, method=method, loss="dpo", **common),
                             f"gapo-{job.objective}")
    check_objectives(job.objectives)
    prompts = load_prompts(job.data.path, job.prompt_column, job.data.split)
    table = pa.table({"idx": pa.array(np.arange(len(prompts), dtype=np.int64)), "prompt": prompts})
    report = LoadReport(total=len(prompts), kept=len(prompts))
    metadata = policy_metadata(job, method=method + "-online", loss="policy_gradient", kl_coef=job.kl_coef,
                               samples_per_prompt=job.samples_per_prompt, max_new_tokens=job.max_new_tokens, **common)
    return train_on_rows(make_task, job, table, report, metadata, f"gapo-online-{job.objective}",
                         tokenize=TokenizePrompts, unit="prompts")


JOB = Job("gapo", "GAPO / P-GAPO: balance per-objective DPO gradients (MGDA)", GAPOJobConfig, make_task, run, flags=(
    Flag("--objectives", "objectives", help=objectives_help() + ", each labelled in the pair file"),
    Flag("--p", "p", float, help="gradient-norm exponent (default 1)"),
    Flag("--preference", "preference", parse=parse_numbers, help="P-GAPO preference, e.g. sentiment=0.7,conciseness=0.3"),
    Flag("--balance-params", "balance_params", choices=("head", "all")),
    Flag("--online", "online", switch=True, help="sample from the policy each step (--data: prompts, e.g. demo:64) "
                                                 "and balance per-objective policy-gradient losses"),
    Flag("--samples-per-prompt", "samples_per_prompt", int, help="online: samples per prompt"),
    Flag("--kl-coef", "kl_coef", float, help="online: KL penalty to the reference"),
    Flag("--max-new-tokens", "max_new_tokens", int, help="online: tokens per sample"),
))
