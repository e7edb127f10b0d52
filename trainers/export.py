"""Export a trained policy as a Hugging Face checkpoint (safetensors + tokenizer + metadata).

The metadata file ``moray.json`` names the objective, the reference model, β, the loss and the
data, so that mixers and the server can check that policies share a reference and a tokenizer.
LoRA policies are merged into full weights on export (a plain HF checkpoint, no peft needed to
load it); the adapter itself is kept in ``adapter/`` for LoRA soups (§6: merge ``B·A`` products).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

METADATA_FILE = "moray.json"


def build_policy(model_cfg, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The trainable module: the base causal LM, wrapped with LoRA adapters if configured."""
    from trainers.models import load_causal_lm

    model = load_causal_lm(model_cfg.name_or_path, model_cfg.trust_remote_code, dtype=dtype)
    if model_cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
            target_modules=list(model_cfg.lora_target_modules), task_type="CAUSAL_LM"))
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def export_policy(state_dict: Dict[str, torch.Tensor], model_cfg, out_dir: str,
                  metadata: Dict[str, Any], dtype: Optional[torch.dtype] = None) -> str:
    """Write ``state_dict`` (as gathered from the engine) as an HF checkpoint in ``out_dir``."""
    from trainers.models import load_tokenizer

    model = build_policy(model_cfg)
    load_matching_state(model, state_dict)
    if model_cfg.lora:
        model.save_pretrained(Path(out_dir) / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    return save_hf(model, load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code), out_dir, metadata)


def load_matching_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a gathered state dict; every parameter must be there (tied duplicates may be absent)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    params = {name for name, _ in model.named_parameters()}  # tied duplicates are not listed
    missing = [k for k in missing if k in params]
    if unexpected or missing:
        raise RuntimeError(f"state dict does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")


def save_hf(model: torch.nn.Module, tokenizer, out_dir: str, metadata: Dict[str, Any]) -> str:
    """safetensors weights, the tokenizer and ``moray.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_metadata(str(out), metadata)
    return str(out)


def write_metadata(policy_dir: str, metadata: Dict[str, Any]) -> None:
    (Path(policy_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))


def read_metadata(policy_dir: str) -> Dict[str, Any]:
    path = Path(policy_dir) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{policy_dir} has no {METADATA_FILE}: not a Moray policy")
    return json.loads(path.read_text())


class PolicyTask:
    """What every policy-training task (DPO, GAPO, MOPO, WRPO) builds and exports: a causal LM from
    ``cfg.model`` (LoRA if asked), exported as a merged HF checkpoint."""

    cfg: Any

    def build(self) -> torch.nn.Module:
        return build_policy(self.cfg.model)

    def export(self, state: Dict[str, torch.Tensor], out_dir: str, metadata: Dict[str, Any]) -> None:
        export_policy(state, self.cfg.model, out_dir, metadata)
