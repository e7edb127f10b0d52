"""Sequence log-probabilities: padding pairs into one concatenated batch and summing the
response tokens' log-probs (ALGORITHMS.md §0: prompt and padding never count).

Shapes: a batch of ``B`` pairs becomes ``input_ids``, ``attention_mask`` and ``response_mask``
of shape ``(2B, T)`` -- rows ``0..B-1`` chosen, ``B..2B-1`` rejected -- so chosen and rejected go
through the model in one forward.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

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


def pad_pairs(rows: Dict[str, Sequence[Any]], pad_id: int, index: Sequence[int] | None = None) -> Dict[str, torch.Tensor]:
    """Right-pad the pairs ``rows[...][index]`` into one ``(2B, T)`` batch (T = longest row)."""
    index = range(len(rows["chosen_ids"])) if index is None else index
    seqs = [rows["chosen_ids"][i] for i in index] + [rows["rejected_ids"][i] for i in index]
    starts = [rows["chosen_start"][i] for i in index] + [rows["rejected_start"][i] for i in index]
    out = pad_sequences(seqs, starts, pad_id)
    if "idx" in rows:
        out["idx"] = torch.as_tensor(np.asarray([rows["idx"][i] for i in index], dtype=np.int64))
    for k in rows:
        if k in ("ref_chosen_logps", "ref_rejected_logps") or k.startswith("sign_"):
            out[k] = torch.as_tensor(np.asarray([rows[k][i] for i in index], dtype=np.float64))
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


def pair_logps(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen+rejected; returns ``(chosen_logps (B,), rejected_logps (B,))``.

    Passes ``logits_to_keep`` (transformers causal LMs) so prompt positions never reach the LM head.
    """
    keep = logits_needed(batch["response_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=keep).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


def length_buckets(rows: Dict[str, Sequence[Any]], batch_size: int, seed: Sequence[int], shuffle: bool = True) -> List[np.ndarray]:
    """Cut a window of pairs into batches of similar length (less padding).

    Sort by the longer of each pair's two sequences, cut into ``batch_size`` chunks, then shuffle
    the chunk order with ``np.random.default_rng(seed)`` -- deterministic for a seed, so a resumed
    run sees the same batches.
    """
    n = len(rows["chosen_ids"])
    lengths = np.array([max(len(rows["chosen_ids"][i]), len(rows["rejected_ids"][i])) for i in range(n)])
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        perm = np.random.default_rng(list(seed)).permutation(len(chunks))
        chunks = [chunks[i] for i in perm]
    return chunks
