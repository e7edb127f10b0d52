"""Evaluation sampling speed, and the base model's answer lengths (for the study's token cap).

``python bench/eval_speed.py [--model DIR] [--prompts 32] [--cap 64]``: tokens/s of the study's
old evaluation path (HF ``generate`` in batches of 16 prompts, ``reward_models.sampling.Generate``)
against the serving engine in process (``serving.engine_sampling.engine_sample``, batches of 64), the
same prompts, samples and cap, measured in one run, with their ratio.

``--lengths 512``: the base model's answer lengths under a cap of 512 (engine sampling): quantiles
and the share of answers that would reach each candidate cap.

``--side-by-side --prompts 128 --cap 1024``: two passes (two seeds) one after the other with 2 torch
threads against the same two passes side by side with 1 thread each (how ``moray study`` evaluates).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from reward_models import GENERATE_TOP_K
from reward_models.prompts import prompt_split
from reward_models.sampling import Generate
from serving.engine_sampling import before_threads, engine_sample


def hf_generate(model: str, prompts, samples: int, cap: int):
    gen = Generate(model, samples, cap, 1.0, 1.0, 2, threads=2, keep_ids=True, top_k=GENERATE_TOP_K)
    tokens = 0
    for i in range(0, len(prompts), 16):
        chunk = list(prompts[i:i + 16])
        got = gen({"prompt": np.array(chunk, dtype=object), "row": np.arange(i, i + len(chunk))})
        tokens += sum(len(r) for row in got["response_ids"] for r in json.loads(row))
    return tokens


def engine_pass(model: str, prompts, a, seed: int = 2, threads: int = 2):
    tic = time.perf_counter()
    got = engine_sample({"base": model}, {"base": 1.0}, prompts, a.samples, a.cap, seed=seed, top_k=GENERATE_TOP_K,
                        batch=a.batch, threads=threads)
    return got, time.perf_counter() - tic


def side_by_side(model: str, prompts, a) -> None:
    import threading

    before_threads()
    tic = time.perf_counter()
    turns = [engine_pass(model, prompts, a, seed=s, threads=2) for s in (2, 3)]
    t_turns = time.perf_counter() - tic
    out = {}
    workers = [threading.Thread(target=lambda s=s: out.__setitem__(s, engine_pass(model, prompts, a, seed=s, threads=1)))
               for s in (2, 3)]
    tic = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    t_side = time.perf_counter() - tic
    tokens = sum(g.tokens for g, _ in turns)
    assert tokens == sum(out[s][0].tokens for s in (2, 3)), "the same passes, the same answers"
    print(f"two passes of {len(prompts)} prompts, cap {a.cap}, batches of {a.batch}: {tokens} tokens")
    print(f"one after the other, 2 threads: {t_turns:.1f}s = {tokens / t_turns:.1f} tokens/s")
    print(f"side by side, 1 thread each:    {t_side:.1f}s = {tokens / t_side:.1f} tokens/s")
    print(f"ratio (side by side / in turn, tokens/s): {t_turns / t_side:.2f}")


def main() -> None:
    from cluster.recipes.base_models import smollm2_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--cap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lengths", type=int, default=0, help="measure answer lengths under this cap instead")
    ap.add_argument("--side-by-side", action="store_true", help="compare passes in turn and side by side instead")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = a.model or smollm2_dir()
    prompts = prompt_split(0, a.prompts, seed=0).heldout
    if a.side_by_side:
        return side_by_side(model, prompts, a)
    if a.lengths:
        tic = time.perf_counter()
        got = engine_sample({"base": model}, {"base": 1.0}, prompts, a.samples, a.lengths, seed=2,
                            top_k=GENERATE_TOP_K, batch=a.batch)
        secs = time.perf_counter() - tic
        from trainers.core.models import load_tokenizer

        tok = load_tokenizer(model)
        lengths = np.array([len(tok(t, add_special_tokens=False)["input_ids"]) for rs in got.texts for t in rs])
        capped = np.mean([c for cs in got.capped for c in cs])
        print(f"{len(lengths)} answers of the base under a cap of {a.lengths}: {got.tokens} tokens in {secs:.0f}s "
              f"({got.tokens / secs:.0f} tokens/s); {capped:.1%} reached the cap")
        print("length quantiles (tokens): " + ", ".join(f"p{q} {np.percentile(lengths, q):.0f}"
                                                      for q in (50, 75, 90, 95, 98, 99, 100)))
        for cap in (64, 96, 128, 192, 256, 384, 512, 640, 768, 1024):
            print(f"  cap {cap}: {np.mean(lengths >= cap):.1%} of answers reach it")
        return
    tic = time.perf_counter()
    before = hf_generate(model, prompts, a.samples, a.cap)
    t_before = time.perf_counter() - tic
    tic = time.perf_counter()
    got = engine_sample({"base": model}, {"base": 1.0}, prompts, a.samples, a.cap, seed=2, top_k=GENERATE_TOP_K,
                        batch=a.batch)
    t_after = time.perf_counter() - tic
    print(f"{a.prompts} prompts x {a.samples} samples, cap {a.cap}, 2 threads")
    print(f"HF generate, batches of 16: {before} tokens in {t_before:.1f}s = {before / t_before:.1f} tokens/s")
    print(f"serving engine, batches of {a.batch}: {got.tokens} tokens in {t_after:.1f}s = {got.tokens / t_after:.1f} "
          f"tokens/s")
    print(f"ratio (engine / generate, tokens/s): {(got.tokens / t_after) / (before / t_before):.2f}")


if __name__ == "__main__":
    main()
