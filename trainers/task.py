"""The one interface between the training loop and a method: a :class:`Task`.

A job (``trainers/jobs/<name>.py``) defines its task; the loop (:mod:`trainers.loop`) calls only
what is written here. Required: :meth:`Task.build`, :meth:`Task.losses`. :meth:`Task.export`
writes an HF checkpoint unless a task overrides it. Optional hooks have defaults that do nothing: :meth:`Task.collate`, :meth:`Task.start_step`,
:meth:`Task.end_step`, :meth:`Task.state` / :meth:`Task.load_state`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Protocol, Sequence, Tuple

import torch

from trainers.batches import pack_pairs, packs_one_row, pad_pairs
from trainers.core.export import module_tensors, parse_size
from trainers.core.metadata import PolicyMetadata
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.deepspeed_setup import load_placement
from trainers.job_config import DataConfig, ModelConfig, TrainConfig
from trainers.policy_export import export_model

Tensor = torch.Tensor


class TaskConfig(Protocol):
    """All the loop and the default hooks read of a task's ``cfg``: every job's config
    (:class:`~trainers.job_config.JobConfig`) has them."""

    objective: str  # the progress bar's and the metrics' objective
    train: TrainConfig  # schedule, seed, devices, checkpoints, packing
    model: ModelConfig  # tokenizer, attention kernel, export dtype and shards
    data: DataConfig  # prompt and response lengths the workers tokenize to


class Task:
    """What the loop trains. ``name`` is the method (progress bar, the metrics' ``method`` tag);
    ``cfg`` the job's config, of which the loop reads only :class:`TaskConfig`."""

    name: str = "task"
    cfg: TaskConfig
    needs_reference = False  # True: rows get ref_<response>_logps from the loop's reference pass (trainers.reference)

    def build(self) -> torch.nn.Module:
        """The trainable module, on the CPU (DeepSpeed moves it)."""
        raise NotImplementedError

    def losses(self, engine, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One micro-batch -> ``(losses (R,), stats)``: the per-row losses whose mean the loop
        backpropagates, and per-row statistics ``{name: (R,)}`` that the loop averages over the
        optimizer step's rows on every worker and reports under the task's own names (e.g. DPO's
        ``reward_margin``). Keep them on the device: the loop reads them once per step."""
        raise NotImplementedError

    def export(self, tensors: Iterable[Tuple[str, Optional[Tensor]]], module: torch.nn.Module, out_dir: str,
               metadata: PolicyMetadata, dtype: torch.dtype) -> None:
        """On rank 0: write the trained model to ``out_dir`` in ``dtype``. ``tensors`` are its
        weights one at a time, as ZeRO gathers them (consume them all, in order: the other ranks
        gather alongside); ``module`` is the engine's (names, shapes and config; partitioned
        under ZeRO-3). This default writes an HF checkpoint of ``cfg.model`` (:func:`trainers.policy_export.export_model`)."""
        m = self.cfg.model
        export_model(tensors, module, load_tokenizer(m.name_or_path, m.trust_remote_code), out_dir, metadata, dtype,
                     parse_size(m.export_shard_size))

    # -- optional hooks ------------------------------------------------------------------------
    def collate(self, rows: Dict[str, Sequence[Any]], pad_id: int, index: Sequence[int]) -> Dict[str, Tensor]:
        """Rows of the worker's shard (``index`` of them) -> one micro-batch: packed without padding
        (``train.packing``; in one row under flash attention) or right-padded."""
        if self.cfg.train.packing:
            return pack_pairs(rows, pad_id, index, one_row=packs_one_row(self.cfg.model.attn_implementation))
        return pad_pairs(rows, pad_id, index)

    def start_step(self, step: int, total_steps: int) -> None:
        """Before each optimizer step's first micro-batch (e.g. WRPO's α schedule)."""

    def end_step(self) -> Dict[str, float]:
        """After each optimizer step: the task's own metrics for it (e.g. GAPO's α, MOPO's dual step)."""
        return {}

    def state(self) -> Dict[str, Any]:
        """JSON saved with every checkpoint (e.g. MOPO's multipliers)."""
        return {}

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state` on resume."""


def pair_stats(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Dict[str, Tensor]:
    """The statistics of a task that ranks pairs: mean margin, accuracy, both rewards (each ``(B,)``)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"reward_margin": c - r, "accuracy": (c > r).to(c.dtype), "chosen_reward": c, "rejected_reward": r}


def build_policy(model_cfg, dtype: torch.dtype = torch.float32, device_map: Optional[str] = None) -> torch.nn.Module:
    """The trainable causal LM of ``model_cfg`` (:class:`~trainers.job_config.ModelConfig`), wrapped
    with LoRA adapters if configured; loaded in ``dtype``, onto ``device_map`` (a device) if given."""
    model = load_causal_lm(model_cfg.name_or_path, model_cfg.trust_remote_code, dtype=dtype,
                           attn_implementation=model_cfg.attn_implementation or None,
                           without_dropout=not model_cfg.keep_dropout, device_map=device_map)
    if model_cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
            target_modules=list(model_cfg.lora_target_modules), task_type="CAUSAL_LM"))
    if model_cfg.gradient_checkpointing:
        # non-reentrant: LoRA's frozen embeddings give inputs without grad, on which reentrant
        # checkpointing drops the adapters' gradients; it also composes with ZeRO-3's hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model



def export_policy(module: torch.nn.Module, model_cfg, out_dir: str, metadata: PolicyMetadata,
                  dtype: torch.dtype = torch.float32) -> str:
    """Write a policy held whole in memory (LoRA merged, its adapter in ``adapter/``) as an HF
    checkpoint in ``out_dir``; training exports stream from the engine instead (:meth:`PolicyTask.export`)."""
    export_model(module_tensors(module), module, load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code),
                 out_dir, metadata, dtype, parse_size(model_cfg.export_shard_size))
    return out_dir


def policy_metadata(job, **entries: Any) -> PolicyMetadata:
    """The ``moray.json`` every policy carries (its objective, reference model, β, whether LoRA was
    merged), and ``entries`` of its job (method, loss, ...)."""
    return PolicyMetadata("policy", job.objective, job.model.name_or_path, job.train.beta,
                          {"lora_merged": job.model.lora, **entries})


class PolicyTask(Task):
    """A task that trains a causal-LM policy from ``cfg.model`` against the reference log-probs of
    its rows, and exports it as an HF checkpoint."""

    needs_reference = True

    def build(self) -> torch.nn.Module:
        """The policy in the training dtype, on the worker's GPU where ZeRO allows (:func:`load_placement`)."""
        return build_policy(self.cfg.model, *load_placement(self.cfg.train))

