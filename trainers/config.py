"""Job configuration: frozen-by-convention dataclasses, one help string per field.

A config comes from three layers, later wins: the dataclass defaults, a YAML file whose sections
mirror the dataclasses (``model:``, ``data:``, ``train:``), and command-line overrides given as
dotted keys (``train.lr=1e-5``). :func:`load_config` does all three and type-checks each value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import yaml


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its documentation (``metadata['help']``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


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
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")


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


@dataclass
class TrainConfig:
    """Optimisation, distribution and checkpointing."""

    loss: str = opt("dpo", "Preference loss: dpo | ipo.")
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
    checkpoint_every: int = opt(50, "Report a resumable checkpoint every N optimizer steps (0: only "
                                "at the end).")
    keep_checkpoints: int = opt(2, "Checkpoints kept in storage.")
    max_failures: int = opt(0, "Worker failures Ray Train recovers from (restart from the last "
                            "checkpoint).")
    storage_path: str = opt("", "Where Ray Train stores checkpoints; default <out>/ray_storage.")
    ref_batch_size: int = opt(16, "Pairs per batch in the reference log-prob pass.")
    log_every: int = opt(10, "Send metrics to Ray Train every N optimizer steps (each report "
                         "carries every step's metrics in 'history'; the progress bar shows each step).")
    fail_at_step: int = opt(-1, "Testing: rank 1 (or 0 with one worker) dies once at this "
                            "optimizer step, to exercise recovery. -1 disables.")


@dataclass
class DPOJobConfig:
    """`moray train dpo`: one policy for one objective."""

    objective: str = opt("", "Name of the objective this policy is aligned to (e.g. sentiment).")
    out: str = opt("", "Output directory: the exported HF policy and run files.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "DPOJobConfig":
        """Fail fast, before any compute, on values no run could use."""
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
        if t.loss not in ("dpo", "ipo"):
            errors.append(f"train.loss must be dpo or ipo, got {t.loss!r}")
        if not (t.beta > 0 and math.isfinite(t.beta)):
            errors.append(f"train.beta must be a positive finite number, got {t.beta}")
        if t.zero_stage not in (0, 1, 2, 3):
            errors.append(f"train.zero_stage must be 0-3, got {t.zero_stage}")
        for name in ("epochs", "micro_batch_size", "grad_accum", "workers", "cpus_per_worker",
                     "bucket_batches", "ref_batch_size", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                errors.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.lr_schedule not in ("cosine", "linear", "constant"):
            errors.append(f"train.lr_schedule must be cosine|linear|constant, got {t.lr_schedule!r}")
        if t.bf16 not in ("auto", "true", "false"):
            errors.append(f"train.bf16 must be auto|true|false, got {t.bf16!r}")
        d = self.data
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
        """Checks of a job kind built on this config (none for DPO)."""
        return []


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, List):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, key) for v in value]
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(v, inner, key) for k, v in value.items()}
    return value


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(cfg: Any, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Set nested dataclass fields from a mapping (YAML section or dotted CLI keys).

    Unknown keys raise, naming the key and the valid ones -- a typo never passes silently.
    """
    types = _field_types(type(cfg))
    for key, value in values.items():
        head, _, rest = key.partition(".")
        full = f"{prefix}{head}"
        if head not in types:
            raise ValueError(f"unknown config key {full!r}; valid: {sorted(types)}")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            if rest:
                apply_overrides(current, {rest: value}, prefix=full + ".")
            elif isinstance(value, Mapping):
                apply_overrides(current, value, prefix=full + ".")
            else:
                raise ValueError(f"{full}: expected a mapping of fields, got {value!r}")
        else:
            if rest:
                raise ValueError(f"{full} is not a section; cannot set {full}.{rest}")
            setattr(cfg, head, _coerce(value, types[head], full))
    return cfg


def parse_dotted(pairs: List[str]) -> Dict[str, Any]:
    """``["train.lr=1e-5", "data.columns={prompt: q}"]`` -> ``{"train.lr": 1e-5, ...}`` (YAML values)."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(cls: type, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (dotted keys)."""
    cfg = cls()
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        apply_overrides(cfg, loaded)
    if overrides:
        apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    return apply_overrides(cls(), values)
