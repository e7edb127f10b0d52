"""Online GAPO / P-GAPO (ALGORITHMS.md §5, ``moray train gapo --online``): per-objective
policy-gradient losses on samples from the current policy, balanced as offline GAPO balances its
DPO losses.

Rows are prompts (``data.path``: a prompt file, an HF dataset or ``demo:N``, as for ``moray
pairs``), rendered with the chat template when the tokenizer has one and left-padded into
``input_ids`` / ``attention_mask``. Per micro-batch, on every worker (:meth:`OnlineGAPOTask.prepare`):

1. ``samples_per_prompt`` samples per prompt from the current policy (``generate`` on the
   engine's module, no grad, seeded by the run seed, the worker and the prompts' row ids);
2. every objective scores every sample with its scorer (``reward_models``: rule-based, learned
   or ``module:function``), loaded once per worker; an empty sample gets the batch's worst score
   of that objective (an empty answer is no better than the worst one);
3. the frozen reference (a copy held by each worker) gives ``log π_ref`` of every sample.

Then objective ``k``'s loss is :func:`trainers.losses.policy_gradient_loss` -- REINFORCE with a
leave-one-out baseline over the prompt's samples and the penalised reward
``r_k − kl_coef·(log π_θ − log π_ref)`` -- and the shared GAPO step balances the K losses'
head gradients (averaged across workers) exactly as offline. In the loop's metrics the
"chosen"/"rejected" rewards are ``log π_θ`` / ``log π_ref`` of the samples (their mean difference
estimates the KL to the reference); ``reward/<objective>`` is each objective's mean score.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from trainers.gapo import GAPOJobConfig, GAPOTask
from trainers.logps import pad_sequences, sequence_logps
from trainers.losses import policy_gradient_loss

log = logging.getLogger(__name__)


class TokenizePrompts:
    """``map_batches`` callable: ``prompt`` rows -> ``prompt_ids`` (the rendered prompt's tokens,
    truncated from the left to ``max_prompt_length``)."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, max_response_length: int,
                 trust_remote_code: bool = False):
        from trainers.models import load_tokenizer

        self.tok = load_tokenizer(tokenizer_path, trust_remote_code)
        self.max_prompt_length = max_prompt_length

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        from reward_models.pairs import render_prompt
        from trainers.data import _ragged

        ids = []
        for p in batch["prompt"]:
            text = render_prompt(self.tok, str(p))
            ids.append(np.asarray(self.tok(text, add_special_tokens=not self.tok.chat_template)["input_ids"]
                                  [-self.max_prompt_length:], dtype=np.int64))
        return {"idx": batch["idx"], "prompt_ids": _ragged(ids)}


def pad_prompts(rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
    """Left-pad prompts ``rows["prompt_ids"][index]`` into ``input_ids`` / ``attention_mask`` ``(B, P)``."""
    seqs = [np.asarray(rows["prompt_ids"][i], dtype=np.int64) for i in index]
    P = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, P - len(s):] = torch.from_numpy(s)
        mask[r, P - len(s):] = 1
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


class OnlineGAPOTask(GAPOTask):
    """The loop's task for online GAPO (see the module docstring)."""

    def __init__(self, cfg: GAPOJobConfig):
        super().__init__(cfg)
        self.name = "online-" + self.name

    def build(self) -> torch.nn.Module:
        from reward_models.rules import get_scorer
        from trainers.models import load_causal_lm, load_tokenizer

        m = self.cfg.model
        self.tok = load_tokenizer(m.name_or_path, m.trust_remote_code)
        self.ref = load_causal_lm(m.name_or_path, m.trust_remote_code).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.scorers = {k: get_scorer(k, self.tok) for k in self.cfg.objectives}
        return super().build()

    def collate(self, rows: Dict[str, Any], pad_id: int, index) -> Dict[str, torch.Tensor]:
        return pad_prompts(rows, pad_id, index)

    @torch.no_grad()
    def _sample(self, module, batch: Dict[str, torch.Tensor]) -> List[List[int]]:
        import torch.distributed as dist

        cfg, n = self.cfg, self.cfg.samples_per_prompt
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        torch.manual_seed(cfg.train.seed * 1_000_003 + rank * 10_007 + int(batch["idx"][0]))
        was_training = module.training
        module.eval()
        out = module.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                              temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                              num_return_sequences=n, pad_token_id=self.tok.pad_token_id)
        module.train(was_training)
        eos = self.tok.eos_token_id
        gen = out[:, batch["input_ids"].shape[1]:].tolist()
        return [g[: g.index(eos) + 1] if eos in g else g for g in gen]

    def prepare(self, engine, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        from reward_models.rules import score_checked

        n = self.cfg.samples_per_prompt
        gen = self._sample(engine.module, batch)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
        seqs = [prompts[i // n] + g for i, g in enumerate(gen)]  # prompt b's samples are rows b·n .. b·n+n-1
        device = batch["input_ids"].device
        out = {k: v.to(device) for k, v in pad_sequences(seqs, [len(prompts[i // n]) for i in range(len(gen))],
                                                       self.tok.pad_token_id).items()}
        texts = self.tok.batch_decode(gen, skip_special_tokens=True)
        prompt_texts = [self.tok.decode(prompts[i // n], skip_special_tokens=True) for i in range(len(gen))]
        empty = np.array([not t.strip() for t in texts])
        self.batch_metrics = {"empty_fraction": float(empty.mean())}
        for k, scorer in self.scorers.items():
            keep = ~empty
            raw = np.zeros(len(texts))
            if keep.any():
                raw[keep] = score_checked(k, scorer, [p for p, e in zip(prompt_texts, empty) if not e],
                                          [t for t, e in zip(texts, empty) if not e])
            scores = fill_empty(raw, empty)
            out[f"reward_{k}"] = torch.as_tensor(scores, dtype=torch.float64, device=device)
            self.batch_metrics[f"reward/{k}"] = float(scores[keep].mean()) if keep.any() else float("nan")
        self.ref.to(device)
        ref_logits = self.ref(input_ids=out["input_ids"], attention_mask=out["attention_mask"], use_cache=False).logits
        out["ref_logps"] = sequence_logps(ref_logits, out["input_ids"], out["response_mask"]).double()
        return out

    def objective_losses(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]):
        """Each objective's per-sample policy-gradient loss ``(B·n,)``; ``log π_θ``, ``log π_ref``."""
        n = self.cfg.samples_per_prompt
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        ref = batch["ref_logps"].to(logps.dtype)
        losses = [policy_gradient_loss(logps.view(-1, n), batch[f"reward_{k}"].to(logps.dtype).view(-1, n),
                                       ref.view(-1, n), self.cfg.kl_coef).reshape(-1)
                  for k in self.cfg.objectives]
        return losses, logps.detach(), ref


def run_online_gapo(job: GAPOJobConfig, address: Optional[str] = None, run_name: Optional[str] = None) -> Dict[str, Any]:
    """Online GAPO / P-GAPO: prompts in, one policy out (``job.out``). Returns the final metrics."""
    import pyarrow as pa

    from reward_models.prompts import load_prompts
    from reward_models.rules import check_objectives
    from trainers.data import LoadReport
    from trainers.launcher import train_on_rows

    job.validate()
    check_objectives(job.objectives)
    prompts = load_prompts(job.data.path, job.prompt_column, job.data.split)  # before Ray starts
    table = pa.table({"idx": pa.array(np.arange(len(prompts), dtype=np.int64)), "prompt": prompts})
    report = LoadReport(total=len(prompts), kept=len(prompts))
    metadata = {"kind": "policy", "method": ("pgapo" if job.preference else "gapo") + "-online",
                "objective": job.objective, "objectives": job.objectives, "preference": job.preference, "p": job.p,
                "balance_params": job.balance_params, "loss": "policy_gradient", "kl_coef": job.kl_coef,
                "samples_per_prompt": job.samples_per_prompt, "max_new_tokens": job.max_new_tokens}
    return train_on_rows("gapo", job, table, report, metadata, run_name or f"gapo-online-{job.objective}", address,
                         with_reference=False, tokenize=TokenizePrompts)
