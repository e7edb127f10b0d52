"""Sets of per-objective policies: parsing ``name=DIR`` lists and checking that they can be mixed.

MPO (§3) needs policies trained from the same reference with the same β; both mixers need one
tokenizer and one architecture. :func:`check_compatible` reads each policy's ``moray.json``,
tokenizer and config and refuses otherwise (``force=True`` downgrades the refusals to warnings).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from trainers.core.config import parse_assignments
from trainers.core.export import VERTICES_DIR, policy_files
from trainers.core.metadata import PolicyMetadata, has_kind, read_metadata

log = logging.getLogger(__name__)


def parse_policies(spec: str) -> Dict[str, str]:
    """``"sentiment=DIR,conciseness=DIR"`` -> ``{"sentiment": DIR, ...}`` (order kept); a conditioned
    policy's directory alone -> its vertices by objective, in training order."""
    if "=" not in spec and "," not in spec.strip() and has_kind(spec.strip(), "conditioned"):
        return conditioned_vertices(spec.strip())
    return parse_assignments(spec, "NAME=DIR", "policies")


def conditioned_vertices(path: str) -> Dict[str, str]:
    """A conditioned policy's vertex policies (objective -> directory), each an ordinary LoRA policy."""
    objectives = read_metadata(path).get("objectives") or []
    missing = [k for k in objectives if not (Path(path) / VERTICES_DIR / k).is_dir()]
    if not objectives or missing:
        raise ValueError(f"{path} is a conditioned policy without the vertex directories of its objectives "
                         f"{objectives} (missing: {missing})")
    return {k: str(Path(path) / VERTICES_DIR / k) for k in objectives}


def _same_model(a: str, b: str) -> bool:
    """Two references to one model: equal strings, or local paths to the same directory."""
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and Path(a).resolve() == Path(b).resolve()


def _vocab_signature(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_files(path).weights)
    return sorted(tok.get_vocab().items()), tok.eos_token_id


def _config_signature(path: str) -> Any:
    cfg = json.loads((Path(policy_files(path).weights) / "config.json").read_text())
    return {k: cfg.get(k) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                    "num_attention_heads", "intermediate_size")}


def check_names(policies: Dict[str, str], meta: Dict[str, PolicyMetadata], allow_rename: bool = False) -> None:
    """Each name must be the objective its policy was trained for (``moray.json``'s ``objective``):
    two swapped directories would otherwise mix the opposite trade-off. ``allow_rename`` accepts
    other names deliberately (with a warning)."""
    renamed = [f"{name}={policies[name]} was trained for {m.objective!r}" for name, m in meta.items()
               if m.objective and m.objective != name]
    if not renamed:
        return
    message = "policy names differ from the objectives the policies were trained for: " + "; ".join(renamed)
    if not allow_rename:
        raise ValueError(message + " (name each policy by its objective, or pass --allow-rename to rename them)")
    log.warning("%s -- using the given names (--allow-rename)", message)


def check_compatible(policies: Dict[str, str], ref: Optional[str] = None, force: bool = False,
                     same_reference: bool = True, allow_rename: bool = False) -> Dict[str, PolicyMetadata]:
    """Read every policy's metadata and refuse mixes that are not defined.

    Checks: each directory is a Moray policy named by its objective (unless ``allow_rename``); one
    tokenizer (same vocabulary and EOS) and one architecture for all (and ``ref``); with
    ``same_reference``, one reference model and one β, and ``ref`` (if given) is that reference.
    Returns the metadata by objective name.
    """
    meta = {name: read_metadata(path) for name, path in policies.items()}
    check_names(policies, meta, allow_rename)
    problems = []
    for name, m in meta.items():
        if m.kind == "conditioned":  # its own weights are the base: mixing them would drop every adapter (not forceable)
            raise ValueError(f"{name}: {policies[name]} is a conditioned policy; give its directory alone "
                             f"(--policies DIR) or its vertices ({VERTICES_DIR}/<objective>) as policies")
        if not m.mixable:
            problems.append(f"{name}: {policies[name]} is a {m.kind!r}, not a policy")
    paths = dict(policies, **({"reference": ref} if ref else {}))
    names = list(paths)
    vocab = {n: _vocab_signature(p) for n, p in paths.items()}
    config = {n: _config_signature(p) for n, p in paths.items()
              if (Path(policy_files(p).weights) / "config.json").exists()}
    for n in names[1:]:
        if vocab[n] != vocab[names[0]]:
            problems.append(f"{n} and {names[0]} have different tokenizers")
        if n in config and names[0] in config and config[n] != config[names[0]]:
            problems.append(f"{n} and {names[0]} have different architectures: {config[n]} vs {config[names[0]]}")
    if same_reference:
        refs = {n: m.reference_model or "" for n, m in meta.items()}
        first = names[0]
        for n, r in refs.items():
            if not _same_model(r, refs[first]):
                problems.append(f"{n} was trained from {r!r} but {first} from {refs[first]!r}")
        betas = {n: m.beta for n, m in meta.items()}
        if len(set(betas.values())) > 1:
            problems.append(f"policies were trained with different beta: {betas}")
        # a vertex's reference is also its base checkpoint beside it (the conditioned policy's directory)
        bases = {policy_files(p).weights for p in policies.values() if policy_files(p).adapter_only}
        if ref and not _same_model(ref, refs[first]) and not any(_same_model(ref, b) for b in bases):
            problems.append(f"reference {ref!r} is not the model the policies were trained from ({refs[first]!r})")
    if problems:
        message = "policies cannot be mixed: " + "; ".join(problems)
        if not force:
            raise ValueError(message + " (--force mixes them anyway)")
        log.warning("%s -- mixing anyway (--force)", message)
    return meta
