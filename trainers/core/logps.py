"""Sequence log-probabilities (docs/algorithms.md §0): the sum of the response tokens' log-probs,
prompt and padding never counted.

Shapes: ``N`` sequences right-padded to ``T``; ``response_mask (N, T)`` is true on response tokens.
"""

from __future__ import annotations

from typing import Dict, Sequence

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


def logits_needed(response_mask: torch.Tensor) -> int:
    """How many trailing positions' logits a batch needs: from the position before its earliest
    response token to the end. The LM head then skips the shared prompt prefix."""
    T = response_mask.shape[1]
    first = int(response_mask.float().argmax(dim=1).min())  # earliest response token over rows
    return min(T, T - first + 1)


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


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s LM head on ``hidden (..., H)`` in float32 (float64 for a float64 model), whatever
    the weights' dtype: a bf16 head would round logits >= 16 to steps of 0.125 before the log-softmax.
    The head is still *called* (its forward swapped for the duration), so ZeRO-3's module hooks
    gather its weight; backward keeps the float32 copy of the weight (V x H) until it has run."""
    head = getattr(model, "module", model).get_output_embeddings()
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if not isinstance(head, torch.nn.Linear):  # e.g. an adapter-wrapped head: its own forward, then upcast
        return head(hidden).to(dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), head.weight.to(dtype), bias)

    head.forward = forward
    try:
        return head(hidden)
    finally:
        del head.forward


def response_logits(model: torch.nn.Module, keep: int, **inputs) -> tuple:
    """One forward of a causal LM over ``inputs`` (``input_ids``, ``attention_mask``): its final hidden
    states at the last ``keep`` positions ``(N, keep, H)`` and their logits from :func:`head_logits`
    ``(N, keep, V)`` in float32 (the model's own head runs on one position only)."""
    out = model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -keep:]
    return head_logits(model, hidden), hidden
