"""Offline sampling through the serving engine: evaluation and serving share one sampling path.

:func:`engine_sample` loads the policies into a :class:`~serving.engine.MixEngine` in this
process, submits every (prompt, sample) as a request with its own seed and weights, and collects
the answers. The engine batches them (continuous batching: a finished row's slot is taken by the
next request at once), so large batches stay full while answers of different lengths end.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Mapping, Optional, Sequence

from reward_models.sampling import Samples
from serving.api import Parsed
from serving.config import ServeConfig
from serving.decode import Sampling
from trainers.core.prompts import ask, encode


def engine_sample(policies: Mapping[str, str], weights: Mapping[str, float], prompts: Sequence[str], samples: int,
                  max_new_tokens: int, seed: int, temperature: float = 1.0, top_k: int = 0, mixing: str = "logits",
                  batch: int = 64, threads: int = 2, cfg: Optional[ServeConfig] = None) -> Samples:
    """``samples`` answers to each prompt from the mix of ``policies`` at ``weights`` (absent
    names weigh 0), decoded by the serving engine in batches of up to ``batch`` rows. Answer j of
    prompt i is seeded ``seed * 1_000_003 + i * samples + j``: the same whatever shares its batch."""
    from serving.engine import MixEngine  # torch and transformers: loaded when sampling

    names = list(policies)
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"weights for {sorted(unknown)}: not among the policies {names}")
    cfg = cfg or ServeConfig(policies=dict(policies), max_batch_size=batch, batch_wait_ms=0, threads=threads,
                             max_tokens_limit=max_new_tokens, default_max_tokens=max_new_tokens).validate()
    engine = MixEngine(cfg)
    try:
        tok = engine.tokenizer
        w = tuple(float(weights.get(k, 0.0)) for k in names)
        n = len(prompts) * samples
        texts: List[List[str]] = [[""] * samples for _ in prompts]
        capped = [[False] * samples for _ in prompts]
        counts = {"tokens": 0, "left": n}
        errors: List[str] = []
        done = threading.Event()
        lock = threading.Lock()

        def collector(i: int, j: int):
            parts: List[str] = []

            def emit(event: Dict) -> None:
                if event["type"] == "delta":
                    parts.append(event["text"])
                    return
                with lock:
                    if event["type"] == "error":
                        errors.append(event["message"])
                    else:
                        texts[i][j], capped[i][j] = "".join(parts), event["finish"] == "length"
                        counts["tokens"] += event["tokens"]
                    counts["left"] -= 1
                    if counts["left"] == 0:
                        done.set()
            return emit

        for i, p in enumerate(prompts):
            ids = encode(tok, ask(tok, p))
            for j in range(samples):
                sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    seed=seed * 1_000_003 + i * samples + j)
                engine.submit(Parsed(ids, w, mixing, sampling, [], False, True), collector(i, j))
        if n:
            done.wait()
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} answers failed: {errors[0]}")
        return Samples(texts, capped, counts["tokens"])
    finally:
        engine.close()
