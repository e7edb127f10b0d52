"""Sequence log-probabilities: padding pairs into one concatenated batch and summing the
response tokens' log-probs (ALGORITHMS.md §0: prompt and padding never count).

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


def pad_sequences(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad token sequences into ``input_ids``, ``attention_mask`` ``(N, T)`` (T = longest) and a
    ``response_mask`` that is true from each row's ``starts[i]`` (its first response token) on."""
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.tensor(np.asarray(s, dtype=np.int64))
    pos = torch.arange(T)[None, :]
    attention_mask = pos < lengths[:, None]
    response_mask = attention_mask & (pos >= torch.tensor([int(s) for s in starts])[:, None])
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "response_mask": response_mask}


def response_names(columns: Iterable[str]) -> List[str]:
    """The responses a row holds, in batch order: ``chosen``, ``rejected``, ``source`` (those present),
    then ``cand_0, cand_1, …``. ``columns``: text columns, or tokenized ones (``<name>_ids``)."""
    names = {c[:-4] if c.endswith("_ids") else c for c in columns}
    fixed = [k for k in ("chosen", "rejected", "source") if k in names]
    return fixed + sorted((k for k in names if re.fullmatch(r"cand_\d+", k)), key=lambda k: int(k[5:]))


def pad_pairs(rows: Dict[str, Sequence[Any]], pad_id: int, index: Sequence[int] | None = None) -> Dict[str, torch.Tensor]:
    """Right-pad the rows ``rows[...][index]`` into one ``(R·B, T)`` batch (T = longest sequence,
    R responses each: 2 for pairs). Float columns that ride along (``ref_<name>_logps``,
    ``sign_<objective>``: ``(B,)``; ``winrate_<objective>``: ``(B, n)``) are kept, in float64."""
    names = response_names(k for k in rows if k.endswith("_ids"))
    index = range(len(rows[f"{names[0]}_ids"])) if index is None else index
    seqs = [rows[f"{n}_ids"][i] for n in names for i in index]
    starts = [rows[f"{n}_start"][i] for n in names for i in index]
    out = pad_sequences(seqs, starts, pad_id)
    if "idx" in rows:
        out["idx"] = torch.as_tensor(np.asarray([rows["idx"][i] for i in index], dtype=np.int64))
    for k in rows:
        if (k.startswith("ref_") and k.endswith("_logps")) or k.startswith(("sign_", "winrate_")):
            out[k] = torch.as_tensor(np.asarray([np.asarray(rows[k][i], dtype=np.float64) for i in index]))
    return out


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of ``log p(token | prefix)``.

    ``input_ids`` and ``response_mask`` are ``(N, T)``; ``logits (N, K, V)`` are a causal LM's
    logits for the last ``K <= T`` positions (``K = T``: all of them). The logits at position
    ``t`` predict token ``t+1``. Returns ``(N,)`` in float32 (float64 if the logits are float64).
    """
    K = logits.shape[1]
    logits = logits[:, :-1]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    labels = input_ids[:, input_ids.shape[1] - K + 1:].unsqueeze(-1)
    token_logps = torch.gather(logits, 2, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = response_mask[:, response_mask.shape[1] - K + 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1)


def logits_needed(response_mask: torch.Tensor) -> int:
    """How many trailing positions' logits a batch needs: from the position before its earliest
    response token to the end. The LM head then skips the shared prompt prefix."""
    T = response_mask.shape[1]
    first = int(response_mask.float().argmax(dim=1).min())  # earliest response token over rows
    return min(T, T - first + 1)


def pair_logps(model: torch.nn.Module, batch: Dict[str, torch.Tensor], responses: int = 2) -> Tuple[torch.Tensor, ...]:
    """One forward over every response of the batch; returns one ``(B,)`` tensor per response
    (pairs: ``(chosen_logps, rejected_logps)``; ``responses``: R of :func:`pad_pairs`).

    Passes ``logits_to_keep`` (transformers causal LMs) so prompt positions never reach the LM head.
    """
    keep = logits_needed(batch["response_mask"])
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
