"""On-policy rollouts for online jobs (online GAPO): prompts in, scored samples of the current
policy out, with the frozen reference's log-probs.

Rows are prompts (:class:`TokenizePrompts`: rendered by :mod:`trainers.core.prompts` as Moray asks
any model, truncated from the left), left-padded into ``input_ids`` / ``attention_mask``
(:func:`pad_prompts`). Per micro-batch :meth:`Rollout.__call__`:

1. ``n`` samples per prompt from the current policy (``generate`` on the engine's module, no grad,
   seeded by the run seed, the worker and the prompts' row ids);
2. every objective scores every sample (rule-based, learned or ``module:function``, loaded once
   per worker); an empty sample gets the batch's worst score of that objective (an empty answer is
   no better than the worst one);
3. the frozen reference gives ``log π_ref`` of every sample, on the response positions only: with
   LoRA the policy itself with its adapters off; otherwise a frozen copy in the training dtype,
   partitioned like the policy under ZeRO-3 (its own DeepSpeed engine, as TRL holds its reference).

Under ZeRO-3 every rank keeps calling the model until all ranks finish sampling (``synced_gpus``):
a rank that stopped early would leave the others waiting in a parameter all-gather.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from reward_models.objectives import get_scorer, score_checked
from trainers.core.logps import logits_needed, pad_sequences, response_logits, sequence_logps
from trainers.core.models import Placement, load_causal_lm, load_tokenizer
from trainers.core.prompts import ask, encode, left_pad
from trainers.data import ragged
from trainers.deepspeed_setup import use_bf16


class TokenizePrompts:
    """``map_batches`` callable: ``prompt`` rows -> ``prompt_ids`` (the rendered prompt's tokens,
    truncated from the left to ``max_prompt_length``)."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, max_response_length: int,
                 trust_remote_code: bool = False):
        self.tok = load_tokenizer(tokenizer_path, trust_remote_code)
        self.max_prompt_length = max_prompt_length

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        ids = [np.asarray(encode(self.tok, ask(self.tok, str(p)), self.max_prompt_length), dtype=np.int64)
               for p in batch["prompt"]]
        return {"idx": batch["idx"], "prompt_ids": ragged(ids)}


def pad_prompts(rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
    """Left-pad prompts ``rows["prompt_ids"][index]`` into ``input_ids`` / ``attention_mask`` ``(B, P)``."""
    input_ids, mask = left_pad([np.asarray(rows["prompt_ids"][i], dtype=np.int64).tolist() for i in index], pad_id)
    return {"input_ids": input_ids, "attention_mask": mask,
            "idx": torch.as_tensor(np.asarray([rows["idx"][i] for i in index], dtype=np.int64))}


def fill_empty(scores: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Empty samples get the worst score of the others (0 when every sample is empty)."""
    out = scores.copy()
    if empty.all():
        out[:] = 0.0
    elif empty.any():
        out[empty] = scores[~empty].min()
    return out


class Rollout:
    """Samples, scores and reference log-probs for one worker (see the module docstring)."""

    def __init__(self, model_cfg, train_cfg, objectives: Sequence[str], samples: int, max_new_tokens: int,
                 temperature: float):
        self.tok = load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code)
        self.zero3 = train_cfg.zero_stage == 3
        self.ref = None if model_cfg.lora else frozen_reference(model_cfg, train_cfg)
        # on the worker's device (its GPU: the current CUDA device), each whole (built outside ZeRO-3)
        self.scorers = {k: get_scorer(k, self.tok, Placement(1.0 if train_cfg.use_gpu else 0.0)) for k in objectives}
        self.n, self.max_new_tokens, self.temperature, self.seed = samples, max_new_tokens, temperature, train_cfg.seed

    @torch.no_grad()
    def sample(self, module, batch: Dict[str, torch.Tensor]) -> List[List[int]]:
        """``n`` samples per prompt (prompt ``b``'s are rows ``b·n .. b·n+n-1``), each cut after its EOS."""
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        torch.manual_seed(self.seed * 1_000_003 + rank * 10_007 + int(batch["idx"][0]))
        was_training = module.training
        module.eval()
        out = module.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                              temperature=self.temperature, top_p=1.0, max_new_tokens=self.max_new_tokens,
                              num_return_sequences=self.n, pad_token_id=self.tok.pad_token_id,
                              synced_gpus=self.zero3 and world > 1)
        module.train(was_training)
        eos = self.tok.eos_token_id
        gen = out[:, batch["input_ids"].shape[1]:].tolist()
        return [g[: g.index(eos) + 1] if eos in g else g for g in gen]

    def __call__(self, module, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The samples of the prompt batch as a right-padded batch (``input_ids``, ``attention_mask``,
        ``response_mask``), ``reward_<objective>`` ``(B·n,)``, ``ref_logps`` ``(B·n,)``, and
        ``metrics``: the empty fraction and each objective's mean score."""
        n = self.n
        gen = self.sample(module, batch)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
        seqs = [prompts[i // n] + g for i, g in enumerate(gen)]
        device = batch["input_ids"].device
        out: Dict[str, Any] = {k: v.to(device) for k, v in pad_sequences(
            seqs, [len(prompts[i // n]) for i in range(len(gen))], self.tok.pad_token_id).items()}
        texts = self.tok.batch_decode(gen, skip_special_tokens=True)
        prompt_texts = [self.tok.decode(prompts[i // n], skip_special_tokens=True) for i in range(len(gen))]
        empty = np.array([not t.strip() for t in texts])
        keep = ~empty
        metrics = {"empty_fraction": float(empty.mean())}
        for k, scorer in self.scorers.items():
            raw = np.zeros(len(texts))
            if keep.any():
                raw[keep] = score_checked(k, scorer, [p for p, e in zip(prompt_texts, empty) if not e],
                                          [t for t, e in zip(texts, empty) if not e])
            scores = fill_empty(raw, empty)
            out[f"reward_{k}"] = torch.as_tensor(scores, dtype=torch.float64, device=device)
            metrics[f"reward/{k}"] = float(scores[keep].mean()) if keep.any() else float("nan")
        out["ref_logps"] = self.reference_logps(module, out).double()
        out["metrics"] = metrics
        return out

    @torch.no_grad()
    def reference_logps(self, module, batch: Dict[str, Any]) -> torch.Tensor:
        """``log π_ref`` of every sample ``(B·n,)``: the LM head only from the first response position on."""
        keep = logits_needed(batch["response_mask"])
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.ref is None:  # LoRA: the base model is the policy with its adapters off
            with module.disable_adapter():
                logits, _ = response_logits(module, keep, **kwargs)
        else:
            logits, _ = response_logits(self.ref, keep, **kwargs)
        return sequence_logps(logits, batch["input_ids"], batch["response_mask"])


def frozen_reference(model_cfg, train_cfg):
    """A frozen copy of the starting policy in the training dtype; under ZeRO-3 partitioned across
    the workers (built under zero.Init while the training engine is being built) in an engine of
    its own that gathers its weights layer by layer."""
    bf16 = use_bf16(train_cfg, train_cfg.use_gpu)
    ref = load_causal_lm(model_cfg.name_or_path, model_cfg.trust_remote_code,
                         dtype=torch.bfloat16 if bf16 else torch.float32, without_dropout=True,
                         attn_implementation=model_cfg.attn_implementation or None).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    if train_cfg.zero_stage != 3:
        return ref.to("cuda" if train_cfg.use_gpu else "cpu")
    import deepspeed

    engine, *_ = deepspeed.initialize(model=ref, config={
        "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10_000}})
    engine.eval()
    return engine
