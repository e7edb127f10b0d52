"""Personalized Soups (docs/algorithms.md §6): merge per-objective policies' weights into one HF checkpoint.

``moray mix soup --policies a=DIR,b=DIR --weights 0.3,0.7 --out DIR``. Full-weight policies merge
``Σ_k w_k θ_k``; policies trained with LoRA also carry their adapter (``adapter/``), and with
``lora=True`` the soup is ``W_base + Σ_k w_k s_k B_k A_k`` on the shared base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from serving.mixing import merge_lora, soup_state_dicts
from serving.policies import check_compatible
from trainers.core.export import ADAPTER_DIR, load_lora_factors, load_matching_state, load_state, save_hf
from trainers.core.metadata import read_metadata
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.weights import check_weights

log = logging.getLogger(__name__)


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
