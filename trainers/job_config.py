"""Training jobs' configuration: the model, the data, the optimisation, and :class:`JobConfig`,
which every job's config extends. Each field carries its documentation (``moray config <job>``);
YAML files and ``--set`` overrides fill them (:mod:`trainers.core.config`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List

from trainers.batches import ATTENTION_ONE_ROW
from trainers.core.config import opt
from trainers.core.export import parse_size
from trainers.losses import LOSSES
from trainers.policy_export import EXPORT_DTYPES


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies


def one_of(names: Iterable[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass
class ModelConfig:
    """Which causal LM to train and how."""

    name_or_path: str = opt("", "Hugging Face hub name or local directory of a causal LM; also "
                            "the frozen reference policy every per-objective policy starts from.")
    trust_remote_code: bool = opt(False, "Allow model code shipped with the checkpoint to run. "
                                  "Off unless you trust the source.")
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights. On export the "
                     "adapters are merged into full HF weights.")
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: List[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"],
                                         "Module names that receive LoRA adapters.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory (works with "
                                       "ZeRO-3 and with LoRA).")
    attn_implementation: str = opt("", "Attention kernel: '' (transformers' default, SDPA), sdpa, eager, "
                                   "flash_attention_2 or flash_attention_3 (GPU, need the flash-attn package; "
                                   "packing then puts a micro-batch in one row, the layout their varlen path reads).")
    export_dtype: str = opt("auto", "The exported weights' dtype: auto (the training dtype: bf16 when trained in "
                            "bf16, else float32) | float32 | bfloat16 | float16.")
    export_shard_size: str = opt("5GB", "Largest safetensors file of the export (Hugging Face's max_shard_size, "
                                 "e.g. 500MB or 5GB); more files get model.safetensors.index.json. The export is "
                                 "written tensor by tensor, never held whole.")
    keep_dropout: bool = opt(False, "Keep the model's dropout while training. Off by default: the reference "
                             "log-probs are taken without dropout, so dropout would only add noise to the log-ratios.")


@dataclass
class DataConfig:
    """Where preference pairs come from and how they become token ids."""

    path: str = opt("", "jsonl or parquet file, a directory of them, a directory written by "
                    "datasets' save_to_disk, or a hub dataset name.")
    format: str = opt("auto", "auto | jsonl | parquet | hf. 'auto' decides from the path.")
    split: str = opt("train", "Split to read from an HF dataset.")
    columns: Dict[str, str] = opt({}, "Rename source columns to prompt/chosen/rejected, e.g. "
                                  "{prompt: question, chosen: good, rejected: bad}.")
    response_columns: List[str] = opt([], "Multi-objective pair files: the two response columns, "
                                      "e.g. [response_0, response_1]. Use with objective_labels.")
    objective_labels: Dict[str, str] = opt({}, "Multi-objective pair files: objective name -> column "
                                           "holding the index (0/1) of the better response, e.g. "
                                           "{helpful: better_response_id, harmless: safer_response_id}.")
    max_prompt_length: int = opt(256, "Prompt tokens kept (truncated from the left).")
    max_response_length: int = opt(256, "Response tokens kept (truncated from the right).")
    skip_invalid: bool = opt(False, "Drop malformed rows and report how many, instead of failing.")
    in_memory_mb: int = opt(64, "Validated rows the driver keeps in memory, in MB of Arrow data; beyond it they "
                            "are written to parquet under train.storage_path as they are validated, and Ray "
                            "Data reads them on the cluster (the driver never holds a large file).")


@dataclass
class TrainConfig:
    """Optimisation, distribution and checkpointing."""

    loss: str = opt("dpo", f"Preference loss: {' | '.join(LOSSES)}.")
    beta: float = opt(0.1, "β of the implicit reward r = β (log π_θ − log π_ref).")
    epochs: int = opt(1, "Passes over the pairs.")
    lr: float = opt(5e-6, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(0, "Linear warm-up, in optimizer steps.")
    lr_schedule: str = opt("cosine", "Decay after warm-up: cosine | linear | constant.")
    micro_batch_size: int = opt(4, "Pairs per worker per forward/backward.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage 0-3.")
    workers: int = opt(1, "Ray Train workers (data-parallel ranks).")
    use_gpu: bool = opt(False, "One GPU per worker; bf16 on GPU, fp32 on CPU.")
    cpus_per_worker: int = opt(1, "CPU cores per worker; also its torch thread count.")
    bf16: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | true | false.")
    seed: int = opt(0, "Seed for model init, shuffling and sampling.")
    shuffle: bool = opt(True, "Shuffle pairs each epoch (seeded, reproducible on resume).")
    bucket_batches: int = opt(32, "Group this many batches' worth of pairs by length before cutting "
                              "batches, to cut padding (1 disables).")
    packing: bool = opt(True, "Pack a micro-batch's sequences into rows without padding (each attends only to "
                        "itself; the LM head runs on response positions only). False: right-padded rows.")
    checkpoint_every: int = opt(50, "Report a resumable checkpoint every N optimizer steps (0: only "
                                "at the end).")
    keep_checkpoints: int = opt(2, "Checkpoints kept in storage.")
    max_failures: int = opt(0, "Worker failures Ray Train recovers from (restart from the last "
                            "checkpoint).")
    storage_path: str = opt("", "Where Ray Train stores checkpoints: a local path or a storage URI (file://, s3://, "
                            "gs://, ...) that every node reaches; default ray_storage/ beside the export "
                            "directory (never inside it).")
    placement_strategy: str = opt("PACK", "How workers spread over nodes: PACK (fewest nodes) | SPREAD (one per node "
                                  "where possible) | STRICT_PACK | STRICT_SPREAD.")
    log_every: int = opt(10, "Send metrics to Ray Train every N optimizer steps (each report "
                         "carries every step's metrics in 'history'; the progress bar shows each step).")


@dataclass
class JobConfig:
    """What every training job has: the objective it serves, where its output goes, the model, the
    data and the optimisation. Each job (``trainers/jobs/<name>.py``) extends it with its own fields."""

    objective: str = opt("", "Name of the objective this policy is aligned to (e.g. sentiment).")
    out: str = opt("", "Where the exported HF checkpoint goes: a local directory or a storage URI (file://, "
                   "s3://, gs://, ...). It holds the weights, config, tokenizer and moray.json only.")
    address: str = opt("", "The Ray cluster to run on, as ray.init takes it; empty: RAY_ADDRESS, else an embedded "
                       "local Ray.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "JobConfig":
        """Fail fast, before any compute, on values no run could use. Returns the config the job
        runs (:meth:`resolved`); this one is never changed."""
        return self.resolved()._checked()

    def resolved(self) -> "JobConfig":
        """This config with the defaults a job derives from its other fields filled in (a copy;
        itself when there are none)."""
        return self

    def _checked(self) -> "JobConfig":
        errors = []
        if not self.objective:
            errors.append("objective is required")
        if not self.out:
            errors.append("out is required")
        if not self.model.name_or_path:
            errors.append("model.name_or_path is required")
        if not self.data.path:
            errors.append("data.path is required")
        t = self.train
        if t.loss not in LOSSES:
            errors.append(f"train.loss must be {one_of(LOSSES)}, got {t.loss!r}")
        if not (t.beta > 0 and math.isfinite(t.beta)):
            errors.append(f"train.beta must be a positive finite number, got {t.beta}")
        if t.zero_stage not in (0, 1, 2, 3):
            errors.append(f"train.zero_stage must be 0-3, got {t.zero_stage}")
        for name in ("epochs", "micro_batch_size", "grad_accum", "workers", "cpus_per_worker",
                     "bucket_batches", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                errors.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.lr_schedule not in ("cosine", "linear", "constant"):
            errors.append(f"train.lr_schedule must be cosine|linear|constant, got {t.lr_schedule!r}")
        if t.bf16 not in ("auto", "true", "false"):
            errors.append(f"train.bf16 must be auto|true|false, got {t.bf16!r}")
        elif t.zero_stage == 0 and (t.bf16 == "true" or (t.bf16 == "auto" and t.use_gpu)):
            errors.append("bf16 training needs train.zero_stage 1-3 (fp32 master weights, gradients accumulated in "
                          "fp32); set train.bf16=false for stage 0")
        if t.placement_strategy not in PLACEMENT_STRATEGIES:
            errors.append(f"train.placement_strategy must be {one_of(PLACEMENT_STRATEGIES)}, got {t.placement_strategy!r}")
        m = self.model
        if m.attn_implementation not in ATTENTION_ONE_ROW:
            errors.append(f"model.attn_implementation must be {one_of(repr(k) for k in ATTENTION_ONE_ROW)}, "
                          f"got {m.attn_implementation!r}")
        if m.export_dtype not in ("auto", *EXPORT_DTYPES):
            errors.append(f"model.export_dtype must be {one_of(['auto', *EXPORT_DTYPES])}, got {m.export_dtype!r}")
        try:
            parse_size(m.export_shard_size)
        except ValueError as e:
            errors.append(f"model.export_shard_size: {e}")
        d = self.data
        if d.in_memory_mb < 0:
            errors.append(f"data.in_memory_mb must be >= 0, got {d.in_memory_mb}")
        if d.max_prompt_length < 1 or d.max_response_length < 1:
            errors.append("data.max_prompt_length and data.max_response_length must be >= 1")
        if d.objective_labels and len(d.response_columns) != 2:
            errors.append("data.objective_labels needs data.response_columns with exactly two names")
        for k in self.labelled_objectives():
            if d.objective_labels and k and k not in d.objective_labels:
                errors.append(f"objective {k!r} has no label column; data.objective_labels "
                              f"names {sorted(d.objective_labels)}")
        errors += self.extra_errors()
        if errors:
            raise ValueError("invalid config: " + "; ".join(errors))
        return self

    def labelled_objectives(self) -> List[str]:
        """Objectives that need a label column in a multi-objective pair file."""
        return [self.objective]

    def extra_errors(self) -> List[str]:
        """Checks of a job's own fields (none here)."""
        return []


def multi_objective(job: JobConfig, objectives: List[str]) -> JobConfig:
    """A copy of a job trained on several objectives' labels of the same pairs (GAPO, the
    conditioned policy): its name joins the objectives, and a pair file without a label mapping is
    read as ``moray pairs``' ``pairs_multi.jsonl`` (response_0/1, better_<k>)."""
    out = dataclasses.replace(job, data=dataclasses.replace(job.data))
    if not out.objective and objectives:
        out.objective = "+".join(objectives)
    if not out.data.objective_labels and objectives:
        out.data.response_columns = out.data.response_columns or ["response_0", "response_1"]
        out.data.objective_labels = {k: f"better_{k}" for k in objectives}
    return out


def objectives_errors(objectives: List[str]) -> List[str]:
    if len(objectives) < 2 or len(set(objectives)) != len(objectives):
        return [f"objectives must name at least two different objectives, got {objectives}"]
    return []
