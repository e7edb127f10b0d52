"""Sampling from a policy on Ray Data actors (the model loads once per actor): on-policy pairs,
evaluation, MPO's reference samples. Prompts are asked as Moray asks any model
(:func:`trainers.core.prompts.ask`), the same rendering training and serving use."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from reward_models import GENERATE_TOP_K
from trainers.core.models import Placement, load_tokenizer
from trainers.core.prompts import ask, encode, left_pad

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Answers ``texts[prompt][sample]``; ``capped[prompt][sample]``: the answer stopped at the
    token cap rather than on EOS; ``tokens``: tokens generated over all answers."""

    texts: List[List[str]]
    capped: List[List[bool]]
    tokens: int


class Generate:
    """``map_batches`` callable class: ``prompt`` rows -> ``responses`` (a JSON list of ``n`` samples).

    ``top_k``: :data:`reward_models.GENERATE_TOP_K` unless given; 0 samples from the whole distribution.
    ``keep_ids``: also ``prompt_ids`` (the rendered prompt's tokens) and ``response_ids`` (each
    sample's tokens up to and including its EOS), as JSON, for teacher-forced scoring of exactly
    the sampled tokens.
    ``placement``: the actor's device and dtype (default: the CPU in fp32).
    """

    def __init__(self, model_path: str, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, threads: int = 1, trust_remote_code: bool = False, keep_ids: bool = False,
                 top_k: int = GENERATE_TOP_K, placement: Optional[Placement] = None):
        torch.set_num_threads(threads)
        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.model = (placement or Placement()).load(model_path, trust_remote_code)
        self.device = self.model.device
        self.n, self.max_new_tokens = n, max_new_tokens
        self.temperature, self.top_p, self.top_k, self.seed = temperature, top_p, top_k, seed
        self.keep_ids = keep_ids

    @torch.no_grad()
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        prompts = [str(p) for p in batch["prompt"]]
        ids = [encode(self.tok, ask(self.tok, p)) for p in prompts]
        input_ids, attention_mask = (t.to(self.device) for t in left_pad(ids, self.tok.pad_token_id))
        # seed from the batch's first row id: the same rows give the same samples on any actor
        torch.manual_seed(self.seed * 1_000_003 + int(batch["row"][0]))
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=self.temperature > 0,
                                  temperature=self.temperature or None, top_p=self.top_p, top_k=self.top_k,
                                  max_new_tokens=self.max_new_tokens, num_return_sequences=self.n,
                                  pad_token_id=self.tok.pad_token_id)
        gen = out[:, input_ids.shape[1]:].cpu()  # one copy to the host per batch
        decoded = self.tok.batch_decode(gen, skip_special_tokens=True)
        responses = [json.dumps([d.strip() for d in decoded[i * self.n:(i + 1) * self.n]]) for i in range(len(prompts))]
        result = {"row": batch["row"], "prompt": np.array(prompts, dtype=object),
                  "responses": np.array(responses, dtype=object)}
        if self.keep_ids:
            eos = self.tok.eos_token_id
            sampled = [until_eos(g, eos) for g in gen.tolist()]
            result["prompt_ids"] = np.array([json.dumps(p) for p in ids], dtype=object)
            result["response_ids"] = np.array([json.dumps(sampled[i * self.n:(i + 1) * self.n])
                                               for i in range(len(prompts))], dtype=object)
        return result


def until_eos(tokens: List[int], eos: Optional[int]) -> List[int]:
    """A generated row cut after its first EOS (generate pads finished rows)."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def sample_responses(model_path: str, prompts: Sequence[str], n: int, max_new_tokens: int = 48,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, actors: int = 1,
                     threads_per_actor: int = 1, batch_size: int = 8,
                     top_k: int = GENERATE_TOP_K, placement: Optional[Placement] = None) -> List[List[str]]:
    """``n`` samples for each prompt, in prompt order, from a Ray Data actor pool (each actor on
    ``placement``: CPU fp32 unless it asks for GPUs)."""
    import ray.data

    ds = ray.data.from_items([{"row": i, "prompt": p} for i, p in enumerate(prompts)])
    ds = ds.map_batches(Generate, fn_constructor_args=(model_path, n, max_new_tokens, temperature, top_p, seed,
                                                       threads_per_actor),
                        fn_constructor_kwargs={"top_k": top_k, "placement": placement},
                        batch_size=batch_size, num_cpus=threads_per_actor, **(placement or Placement()).resources(),
                        compute=ray.data.ActorPoolStrategy(size=actors))
    rows = sorted(ds.take_all(), key=lambda r: r["row"])
    return [json.loads(r["responses"]) for r in rows]


def stage_groups(demands: Sequence[float], available: float) -> List[List[int]]:
    """Consecutive stages grouped so that each group's GPUs (``demands[i]`` for stage i's whole
    actor pool) fit the ``available`` ones: a group's pools run side by side, groups one after
    another. Ray Data starts every pool of a pipeline at once, so a downstream pool holding the GPU
    its upstream stage waits for would wait forever. ValueError when one stage alone cannot fit."""
    too_big = [i for i, d in enumerate(demands) if d > available]
    if too_big:
        raise ValueError(f"stage {too_big[0]} needs {demands[too_big[0]]:g} GPUs (actors x GPUs per actor) but the "
                         f"cluster has {available:g}: ask for fewer actors or fewer GPUs per actor")
    groups: List[List[int]] = []
    held = available + 1.0
    for i, d in enumerate(demands):
        if held + d > available:
            groups.append([])
            held = 0.0
        groups[-1].append(i)
        held += d
    return groups


def run_stages(ds, stages: Sequence[Any], actors: int, resources: Dict[str, float], batch_size: int,
               num_cpus: Optional[float] = None):
    """``ds`` through ``stages`` (``(callable class, constructor args, constructor kwargs)``), each
    an actor pool of ``actors`` actors asking ``resources``: all streaming side by side when the
    cluster's GPUs hold every pool, else in :func:`stage_groups`, each group materialised (its
    actors, and their GPUs, released) before the next starts. A cluster showing no GPU yet (an
    autoscaler adds them) streams."""
    import ray
    import ray.data

    demand = actors * float(resources.get("num_gpus", 0))
    available = float(ray.cluster_resources().get("GPU", 0))
    groups = stage_groups([demand] * len(stages), available) if demand and available else [list(range(len(stages)))]
    if len(groups) > 1:
        log.info("the %d stages' GPU actor pools need %g GPUs, the cluster has %g: running them in %d groups, "
                 "one after another", len(stages), demand * len(stages), available, len(groups))
    extra = {"num_cpus": num_cpus} if num_cpus else {}
    for g, group in enumerate(groups):
        for i in group:
            fn, args, kwargs = stages[i]
            ds = ds.map_batches(fn, fn_constructor_args=args, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=actors), **extra, **resources)
        if g < len(groups) - 1:
            ds = ds.materialize()
    return ds
