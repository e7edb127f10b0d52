"""Micro-batches of preference rows: padding every response of a row into one concatenated batch,
their sequence log-probs in one forward, and grouping rows by length.

Shapes: a batch of ``B`` pairs becomes ``input_ids``, ``attention_mask`` and ``response_mask``
of shape ``(2B, T)`` -- rows ``0..B-1`` chosen, ``B..2B-1`` rejected -- so chosen and rejected go
through the model in one forward. Rows with more responses per prompt (WRPO's ``source``, MOPO's
candidates ``cand_0..cand_{n-1}``) stack the same way: ``R`` responses give ``(R·B, T)``, response
``r`` of prompt ``b`` at row ``r·B + b`` (order: :func:`response_names`).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch

from trainers.core.logps import pad_sequences, sequence_logps


def response_names(columns: Iterable[str]) -> List[str]:
    """The responses a row holds, in batch order: ``chosen``, ``rejected``, ``source`` (those present),
    then ``cand_0, cand_1, …``. ``columns``: text columns, or tokenized ones (``<name>_ids``)."""
    names = {c[:-4] if c.endswith("_ids") else c for c in columns}
    fixed = [k for k in ("chosen", "rejected", "source") if k in names]
    return fixed + sorted((k for k in names if re.fullmatch(r"cand_\d+", k)), key=lambda k: int(k[5:]))


def pad_pairs(rows: Dict[str, Sequence[Any]], pad_id: int, index: Sequence[int] | None = None) -> Dict[str, Any]:
    """Right-pad the rows ``rows[...][index]`` into one ``(R·B, T)`` batch (T = longest sequence,
    R responses each: 2 for pairs). Float columns that ride along (``ref_<name>_logps``,
    ``sign_<objective>``: ``(B,)``; ``winrate_<objective>``: ``(B, n)``) are kept, in float64;
    ``logits_to_keep`` is :func:`logits_needed` of the batch, an int."""
    names = response_names(k for k in rows if k.endswith("_ids"))
    index = range(len(rows[f"{names[0]}_ids"])) if index is None else index
    seqs = [rows[f"{n}_ids"][i] for n in names for i in index]
    starts = [rows[f"{n}_start"][i] for n in names for i in index]
    out: Dict[str, Any] = pad_sequences(seqs, starts, pad_id)
    out["logits_to_keep"] = logits_needed(out["response_mask"])  # here, on the host: no device sync later
    if "idx" in rows:
        out["idx"] = torch.as_tensor(np.asarray([rows["idx"][i] for i in index], dtype=np.int64))
    for k in rows:
        if (k.startswith("ref_") and k.endswith("_logps")) or k.startswith(("sign_", "winrate_")):
            out[k] = torch.as_tensor(np.asarray([np.asarray(rows[k][i], dtype=np.float64) for i in index]))
    return out


def logits_needed(response_mask: torch.Tensor) -> int:
    """How many trailing positions' logits a batch needs: from the position before its earliest
    response token to the end. The LM head then skips the shared prompt prefix."""
    T = response_mask.shape[1]
    first = int(response_mask.float().argmax(dim=1).min())  # earliest response token over rows
    return min(T, T - first + 1)


def batch_logits_to_keep(batch: Dict[str, Any]) -> int:
    """The batch's ``logits_to_keep`` as :func:`pad_pairs` computed it (else from its mask)."""
    keep = batch.get("logits_to_keep")
    return int(keep) if isinstance(keep, int) else logits_needed(batch["response_mask"])


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The batch's tensors on ``device`` (other entries as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pair_logps(model: torch.nn.Module, batch: Dict[str, torch.Tensor], responses: int = 2) -> Tuple[torch.Tensor, ...]:
    """One forward over every response of the batch; returns one ``(B,)`` tensor per response
    (pairs: ``(chosen_logps, rejected_logps)``; ``responses``: R of :func:`pad_pairs`).

    Passes ``logits_to_keep`` (transformers causal LMs) so prompt positions never reach the LM head.
    """
    keep = batch_logits_to_keep(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=keep).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    return tuple(logps.view(responses, -1))


def length_buckets(rows: Dict[str, Sequence[Any]], batch_size: int, seed: Sequence[int], shuffle: bool = True) -> List[np.ndarray]:
    """Cut a window of pairs into batches of similar length (less padding).

    Sort by the longest of each row's sequences, cut into ``batch_size`` chunks, then shuffle
    the chunk order with ``np.random.default_rng(seed)`` -- deterministic for a seed, so a resumed
    run sees the same batches.
    """
    cols = [rows[k] for k in rows if k.endswith("_ids")]  # every sequence of the row (online GAPO: its prompt)
    n = len(cols[0])
    lengths = np.array([max(len(c[i]) for c in cols) for i in range(n)])
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        perm = np.random.default_rng(list(seed)).permutation(len(chunks))
        chunks = [chunks[i] for i in perm]
    return chunks
