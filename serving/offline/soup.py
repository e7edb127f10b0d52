"""Personalized Soups (docs/algorithms.md §6): merge per-objective policies' weights into one HF checkpoint.

``moray mix soup --policies a=DIR,b=DIR --weights 0.3,0.7 --out DIR``. Full-weight policies merge
``Σ_k w_k θ_k``; policies trained with LoRA also carry their adapter (``adapter/``), and with
``lora=True`` the soup is ``W_base + Σ_k w_k s_k B_k A_k`` on the shared base -- always so for
adapters stored alone (a conditioned policy's vertices: ``--policies OUT`` gives its model at ``w``, §9).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

from serving.mixing import merge_lora, soup_state_dicts
from serving.policies import check_compatible
from trainers.core.export import ADAPTER_DIR, load_lora_factors, load_matching_state, load_state, policy_files, save_hf
from trainers.core.metadata import PolicyMetadata, read_metadata
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
    files = [policy_files(policies[n]) for n in names]
    if lora or any(f.adapter_only for f in files):  # an adapter stored alone has no full weights to merge
        missing = [n for n, f in zip(names, files) if f.adapter is None]
        if missing:
            raise ValueError(f"policies {missing} have no {ADAPTER_DIR}/ (not trained with LoRA); merge full weights instead")
        bases = {f.weights for f in files if f.adapter_only}
        if len(bases) > 1:
            raise ValueError(f"the adapters stored alone sit on different bases: {sorted(bases)}")
        lora = True
        model = load_causal_lm(bases.pop() if bases else meta[names[0]].reference_model)
        merged = merge_lora(model.state_dict(), [load_lora_factors(f.adapter) for f in files], w)
    else:
        model = load_causal_lm(first)
        merged = soup_state_dicts([load_state(policies[n]) for n in names], w)
    load_matching_state(model, merged)
    source = PolicyMetadata.from_json({k: v for k, v in read_metadata(first).to_json().items() if k != "base"})
    metadata = source.with_entries(kind="soup", objective="+".join(names), weights=dict(zip(names, w)),
                                                 sources=dict(policies), lora_soup=lora)
    save_hf(model, load_tokenizer(first), out, metadata)
    log.info("merged %s with weights %s into %s", names, [round(x, 4) for x in w], out)
    return out
