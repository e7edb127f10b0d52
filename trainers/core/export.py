"""Hugging Face checkpoints on disk: safetensors weights, the tokenizer and ``moray.json``.

``moray.json`` names a policy's objective, reference model, β, loss and data, so that mixers and
the server can check that policies share a reference and a tokenizer. Weights are read from
safetensors only (never a pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

METADATA_FILE = "moray.json"
ADAPTER_DIR = "adapter"  # a LoRA policy's adapter, beside its merged weights


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


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors from its safetensors files."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_matching_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a full state dict; every parameter must be there (tied duplicates may be absent)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    params = {name for name, _ in model.named_parameters()}  # tied duplicates are not listed
    missing = [k for k in missing if k in params]
    if unexpected or missing:
        raise RuntimeError(f"state dict does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
