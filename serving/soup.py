"""Personalized Soups (docs/algorithms.md §6): merge per-objective policies' weights into one HF checkpoint.

``moray mix soup --policies a=DIR,b=DIR --weights 0.3,0.7 --out DIR``. Full-weight policies merge
``Σ_k w_k θ_k``; policies trained with LoRA also carry their adapter (``adapter/``), and with
``lora=True`` the soup is ``W_base + Σ_k w_k s_k B_k A_k`` on the shared base.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple

import torch

from serving.mixing import LoraFactors, merge_lora, soup_state_dicts
from serving.policies import check_compatible
from trainers.core.export import ADAPTER_DIR, load_matching_state, load_state, save_hf
from trainers.core.metadata import read_metadata
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.weights import check_weights

log = logging.getLogger(__name__)

def load_lora_factors(adapter_dir: str) -> LoraFactors:
    """A peft adapter directory -> ``{base weight name: (A, B, scaling)}``."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        factors[module + ".weight"] = (A, B, scaling)
    if not factors:
        raise ValueError(f"{adapter_dir} holds no LoRA factors")
    return factors


def soup_policies(policies: Mapping[str, str], weights: Sequence[float] | Mapping[str, float], out: str,
                  lora: bool = False, force: bool = False, allow_rename: bool = False) -> str:
    """Merge ``policies`` (objective -> dir) with ``weights`` (normalised onto the simplex) into an
    HF checkpoint at ``out``; its ``moray.json`` records the weights and sources."""
    names = list(policies)
    w = check_weights(weights, names)
    meta = check_compatible(dict(policies), force=force, allow_rename=allow_rename)
    first = policies[names[0]]
    if lora:
        base_path = meta[names[0]].reference_model
        missing = [n for n in names if not (Path(policies[n]) / ADAPTER_DIR).exists()]
        if missing:
            raise ValueError(f"policies {missing} have no {ADAPTER_DIR}/ (not trained with LoRA); merge full weights instead")
        model = load_causal_lm(base_path)
        merged = merge_lora(model.state_dict(), [load_lora_factors(str(Path(policies[n]) / ADAPTER_DIR)) for n in names], w)
    else:
        model = load_causal_lm(first)
        merged = soup_state_dicts([load_state(policies[n]) for n in names], w)
    load_matching_state(model, merged)
    metadata = read_metadata(first).with_entries(kind="soup", objective="+".join(names), weights=dict(zip(names, w)),
                                                 sources=dict(policies), lora_soup=lora)
    save_hf(model, load_tokenizer(first), out, metadata)
    log.info("merged %s with weights %s into %s", names, [round(x, 4) for x in w], out)
    return out
