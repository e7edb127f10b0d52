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

# transformers' loading is not thread-safe (models loaded side by side came back with untied heads)
_LOADING = threading.Lock()


def before_threads() -> None:
    """Resolve transformers' lazy attributes in the calling thread. Call it before starting threads
    that sample: a thread whose first use meets another thread's (a scorer loading, say) raises
    AttributeError, and a lock here cannot cover the other thread."""
    import transformers

    _ = (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.DynamicCache)


def engine_sample(policies: Mapping[str, str], weights: Mapping[str, float], prompts: Sequence[str], samples: int,
                  max_new_tokens: int, seed: int, temperature: float = 1.0, top_k: int = 0, mixing: str = "logits",
                  batch: int = 64, threads: int = 2, cfg: Optional[ServeConfig] = None) -> Samples:
    """``samples`` answers to each prompt from the mix of ``policies`` at ``weights`` (absent
    names weigh 0), decoded by the serving engine in batches of up to ``batch`` rows. Answer j of
    prompt i is seeded ``seed * 1_000_003 + i * samples + j``: the same whatever shares its batch."""
    return engine_sample_vectors(policies, [weights], prompts, samples, max_new_tokens, seed, temperature, top_k,
                                 mixing, batch, threads, cfg)[0]


def engine_sample_vectors(policies: Mapping[str, str], vectors: Sequence[Mapping[str, float]], prompts: Sequence[str],
                          samples: int, max_new_tokens: int, seed: int, temperature: float = 1.0, top_k: int = 0,
                          mixing: str = "logits", batch: int = 64, threads: int = 2,
                          cfg: Optional[ServeConfig] = None) -> List[Samples]:
    """:func:`engine_sample` at each weight vector of ``vectors``, all in one engine run: rows of
    every vector share the batches, so the batch stays full until the last answers of all of them
    (one pass's tail, where a few long answers decode alone, instead of one per vector). Each
    vector's answers are seeded as :func:`engine_sample` seeds them, so they equal its answers."""
    from serving.engine import MixEngine  # torch and transformers: loaded when sampling

    names = list(policies)
    for weights in vectors:
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"weights for {sorted(unknown)}: not among the policies {names}")
    cfg = cfg or ServeConfig(policies=dict(policies), max_batch_size=batch, batch_wait_ms=0, threads=threads,
                             max_tokens_limit=max_new_tokens, default_max_tokens=max_new_tokens).validate()
    with _LOADING:
        engine = MixEngine(cfg)
    try:
        tok = engine.tokenizer
        n = len(prompts) * samples * len(vectors)
        texts = [[[""] * samples for _ in prompts] for _ in vectors]
        capped = [[[False] * samples for _ in prompts] for _ in vectors]
        counts = {"left": n}
        tokens = [0] * len(vectors)
        errors: List[str] = []
        done = threading.Event()
        lock = threading.Lock()

        def collector(v: int, i: int, j: int):
            parts: List[str] = []

            def emit(event: Dict) -> None:
                if event["type"] == "delta":
                    parts.append(event["text"])
                    return
                with lock:
                    if event["type"] == "error":
                        errors.append(event["message"])
                    else:
                        texts[v][i][j], capped[v][i][j] = "".join(parts), event["finish"] == "length"
                        tokens[v] += event["tokens"]
                    counts["left"] -= 1
                    if counts["left"] == 0:
                        done.set()
            return emit

        ids = [encode(tok, ask(tok, p)) for p in prompts]
        for v, weights in enumerate(vectors):
            w = tuple(float(weights.get(k, 0.0)) for k in names)
            for i, prompt_ids in enumerate(ids):
                for j in range(samples):
                    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        seed=seed * 1_000_003 + i * samples + j)
                    engine.submit(Parsed(prompt_ids, w, mixing, sampling, [], False, True), collector(v, i, j))
        if n:
            done.wait()
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} answers failed: {errors[0]}")
        return [Samples(texts[v], capped[v], tokens[v]) for v in range(len(vectors))]
    finally:
        engine.close()
