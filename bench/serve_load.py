"""Load and recovery of the mixed-policy Serve app on a local Ray, tiny models, loopback only.

Phase 1: ``--requests`` requests from ``--clients`` concurrent clients, each with its own weight
vector and mixing mode (logits with random weights, soup with one of five vectors): count of
non-2xx answers, p50/p99 latency, requests/s.
Phase 2: the same load against two replicas; a quarter of the way in, one replica is killed
(``ray.kill`` on its actor). Each client retries a failed request once; reported: requests that
failed on the first try and requests that still failed after the retry.

    python bench/serve_load.py [--requests 2000] [--clients 16] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
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

from cluster.recipes.base_models import build_tiny_model  # noqa: E402
from reward_models.prompts import demo_prompts, tiny_corpus  # noqa: E402
from tests.helpers import make_policy  # noqa: E402

SOUP_VECTORS = [{"sentiment": w, "conciseness": 1 - w} for w in (0.0, 0.25, 0.5, 0.75, 1.0)]


def tiny_base(root: Path) -> str:
    """The tiny model under ``root/base`` (built once)."""
    base = root / "base"
    return str(base) if (base / "config.json").exists() else build_tiny_model(str(base), tiny_corpus(400, seed=0))


def tiny_policies(root: Path) -> dict:
    base = tiny_base(root)
    return {"sentiment": make_policy(base, str(root / "sentiment"), 1),
            "conciseness": make_policy(base, str(root / "conciseness"), 2)}


def bench_policies(root: Path, tiny: bool) -> dict:
    """Two policies to serve: the tiny ones, or nudged copies of SmolLM2-135M-Instruct."""
    if tiny:
        return tiny_policies(root)
    from cluster.recipes.base_models import smollm2_dir

    base = smollm2_dir()
    return {k: make_policy(base, str(root / k), seed, noise=1e-3, objective=k)
            for seed, k in enumerate(("sentiment", "conciseness"), 1)}


def request_body(i: int, max_tokens: int, prompts) -> dict:
    rng = np.random.default_rng(i)
    body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "seed": i}
    if i % 4 == 3:
        body.update(mixing="soup", objective_weights=SOUP_VECTORS[i % len(SOUP_VECTORS)])
    else:
        w = float(rng.uniform())
        body.update(mixing="logits", objective_weights={"sentiment": w, "conciseness": 1 - w})
    return body


def run_load(url: str, n: int, clients: int, max_tokens: int, retry: bool, on_progress=None) -> dict:
    prompts = demo_prompts(64, seed=3)
    local = threading.local()
    done = [0]
    lock = threading.Lock()

    def one(i: int):
        session = getattr(local, "s", None) or requests.Session()
        local.s = session
        body = request_body(i, max_tokens, prompts)
        tries = []
        for _ in range(2 if retry else 1):
            tic = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/completions", json=body, timeout=60)
                ok, tokens = r.status_code == 200, (r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0)
                status = r.status_code
            except requests.RequestException as e:
                ok, tokens, status = False, 0, type(e).__name__
            tries.append((ok, time.perf_counter() - tic, tokens, status))
            if ok:
                break
            time.sleep(0.5)
        with lock:
            done[0] += 1
            if on_progress:
                on_progress(done[0])
        return tries

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    seconds = time.perf_counter() - tic
    first = [r[0] for r in results]
    final = [r[-1] for r in results]
    lat = np.array([t[1] for t in final if t[0]])
    statuses = sorted({str(t[3]) for t in first if not t[0]})
    return {"requests": n, "clients": clients, "seconds": round(seconds, 1), "requests_per_s": round(n / seconds, 1),
            "tokens_per_s": round(sum(t[2] for t in final) / seconds, 1),
            "failed_first_try": sum(not t[0] for t in first), "failed_after_retry": sum(not t[0] for t in final),
            "failure_statuses": statuses,
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if len(lat) else None}


def kill_one_replica() -> str:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "MixedPolicy" in a["name"] and a["namespace"] == "serve" and "REPLICA" in a["name"].upper()]
    if not names:
        raise RuntimeError("no MixedPolicy replica actor found")
    ray.kill(ray.get_actor(names[0]["name"], namespace="serve"), no_restart=True)
    return names[0]["name"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()

    from ray import serve

    from serving.config import ServeConfig
    from serving.deploy import run_serve_file, serve_file
    from trainers.core.config import load_config
    from trainers.core.runtime import free_port, init_ray

    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        policies = tiny_policies(Path(tmp))
        report = {}
        for phase, replicas in (("steady", 1), ("replica_killed", 2)):
            cfg = load_config(ServeConfig, overrides={
                "policies": policies, "min_replicas": replicas, "max_replicas": replicas, "num_cpus": 0.5,
                "max_tokens_limit": 64, "max_ongoing_requests": 64, "batch_wait_ms": 2})
            url = run_serve_file(serve_file(cfg, port=free_port()))
            requests.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=60)
            killed = {}

            def on_progress(k: int, n=args.requests):
                if phase == "replica_killed" and k == n // 4 and not killed:
                    killed["name"] = kill_one_replica()
                    killed["at_request"] = k

            result = run_load(url, args.requests, args.clients, args.max_tokens, retry=phase == "replica_killed",
                              on_progress=on_progress)
            result.update(replicas=replicas, **({"killed": killed} if killed else {}))
            report[phase] = result
            print(f"{phase}: {json.dumps(result)}", flush=True)
            serve.shutdown()
    s, k = report["steady"], report["replica_killed"]
    print(f"\n{s['requests']} requests, {s['clients']} clients, 1 replica: {s['failed_first_try']} non-2xx, "
          f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, {s['requests_per_s']} req/s")
    print(f"2 replicas, one killed at request {k.get('killed', {}).get('at_request')}: {k['failed_first_try']} failed "
          f"on the first try ({', '.join(k['failure_statuses']) or 'none'}), {k['failed_after_retry']} after one retry")


if __name__ == "__main__":
    main()
