"""Lock-step decoding of K causal LMs with MPO logit mixing (§3a), batched across requests.

Every model keeps its own KV cache; each step feeds one new token per row to each model and
mixes the K next-token logits with the row's own weights (``serving.mixing.mix_logits``). A model
whose weight is zero in every row of a batch is skipped entirely (``e_k`` costs one model). With
K = 1 this is plain incremental decoding (the soup mode).

Shapes: ``B`` requests, prompts left-padded to ``L``; position ids count real tokens only, so a
padded row decodes exactly like the same prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from serving.mixing import mix_logits


@dataclass
class Sampling:
    """Per-request decoding parameters (validated by the caller)."""

    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off; else sample among the k most likely tokens (before top_p, as HF generate)
    seed: Optional[int] = None
    ignore_eos: bool = False  # decode max_tokens tokens whatever comes (benchmarks; vLLM has the same flag)


@dataclass
class Row:
    prompt_ids: List[int]
    weights: Sequence[float]  # one per model
    sampling: Sampling = field(default_factory=Sampling)


def next_token_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """``(V,)`` float64 distribution of the next token for ``logits (V,)`` at ``s.temperature > 0``:
    temperature, then top-k, then top-p on what top-k kept (the order of HF ``generate``'s warpers)."""
    scores = logits.double() / s.temperature
    if 0 < s.top_k < scores.numel():
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return probs


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One token from ``logits (V,)``: argmax at temperature 0, else a draw from :func:`next_token_probs`."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(next_token_probs(logits, s), 1, generator=generator))


class LockstepDecoder:
    """Decode a batch of rows through ``models`` (one tokenizer, one vocabulary)."""

    def __init__(self, models: Sequence[torch.nn.Module], pad_id: int, eos_ids: Sequence[int], device: str = "cpu"):
        self.models, self.pad_id, self.eos = list(models), pad_id, set(eos_ids)
        self.device = torch.device(device)

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], on_token: Optional[Callable[[int, int], bool]] = None) -> List[List[int]]:
        """Token ids generated for each row (its EOS included when it stopped on one).

        ``on_token(row, token)`` is called for every new token; returning True finishes that row
        (a stop string, a cancelled request).
        """
        from transformers import DynamicCache

        B = len(rows)
        W = torch.tensor([list(r.weights) for r in rows], dtype=torch.float32, device=self.device)  # (B, K)
        if W.shape[1] != len(self.models):
            raise ValueError(f"{W.shape[1]} weights per row for {len(self.models)} models")
        active = [k for k in range(len(self.models)) if bool((W[:, k] != 0).any())]
        L = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, L - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        caches = {k: DynamicCache() for k in active}
        gens = [torch.Generator().manual_seed(r.sampling.seed if r.sampling.seed is not None
                                              else int(torch.randint(2**62, (1,)))) for r in rows]
        out: List[List[int]] = [[] for _ in rows]
        done = [False] * B
        limit = max(r.sampling.max_tokens for r in rows)
        step_ids, step_pos = ids, positions
        for _ in range(limit):
            logits = torch.stack([self.models[k](input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                                 past_key_values=caches[k], use_cache=True,
                                                 logits_to_keep=1).logits[:, -1].float() for k in active])
            mixed = mix_logits(logits, W[:, active]).cpu()
            nxt = torch.full((B,), self.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                if done[i]:
                    continue
                tok = sample_next(mixed[i], r.sampling, gens[i])
                nxt[i] = tok
                out[i].append(tok)
                stop = on_token(i, tok) if on_token else False
                if stop or (tok in self.eos and not r.sampling.ignore_eos) or len(out[i]) >= r.sampling.max_tokens:
                    done[i] = True
            if all(done):
                break
            step_ids = nxt[:, None].to(self.device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=1)
        return out
