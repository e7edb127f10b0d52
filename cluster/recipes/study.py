"""``moray study``: every Moray method on the demo task, side by side.

Sentiment and conciseness on SmolLM2-135M-Instruct (``--tiny``: the demo's tiny model). From one
set of on-policy samples of the base model it produces

- the base; one DPO policy per objective;
- linear scalarisation: DPO on pairs labelled by ``Σ_k w_k z_k`` (each objective's score
  standardised over the samples) for w_sentiment ∈ {0.25, 0.5, 0.75};
- MPO logits mixing of the two DPO policies at the same w and at the BSMD max-min weights;
  Personalized Soups at the same w;
- GAPO; P-GAPO with preference (w, 1 − w) at the same w (at w = 0.5 that is GAPO, §5: trained
  once); MOPO (conciseness maximised, sentiment win-rate held at two thresholds); WRPO with the
  two DPO policies as sources and the base as target; the preference-conditioned policy (one
  training run) served at the same w;

and the two per-objective DPO policies and ``ls-0.5`` again with other training seeds (training
noise). Every policy and mix is sampled for evaluation by the serving engine in this process
(:mod:`serving.engine_sampling`; a sweep's vectors in one pass, two passes side by side) on held-out
prompts that nothing trained or searched on, with a token cap few of the base's answers reach;
:mod:`cluster.recipes.study_report` compares the methods' hypervolumes (reference: sentiment −1,
length at the cap) with paired bootstrap intervals over prompts and
writes ``study.md``, ``study.json`` and ``study.png``. Cost is the wall-clock seconds to produce a
policy from the base, counting the shared sampling of training data, its own data and training,
its mixing, and the per-objective policies it mixes or fuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cluster.recipes.demo import OBJECTIVES, Steps, pipeline, policy_constraints
from cluster.recipes.study_report import RETRAINING, compare, format_study, plot_study, seed_report
from reward_models.evaluate import EvalSettings, evaluate, write_json
from reward_models.pairs import best_vs_worst, make_wrpo_pairs, scalarise, write_jsonl
from reward_models.sampling import Samples
from serving.engine_sampling import before_threads, engine_sample_vectors
from serving.offline.soup import soup_policies
from trainers.jobs import JOBS

log = logging.getLogger(__name__)

WEIGHTS = (0.25, 0.5, 0.75)           # w_sentiment; w_conciseness = 1 - w
MOPO_THRESHOLDS = (0.5, 0.55)         # sentiment win-rate against the base's own samples (0.6 is infeasible for
                                      # SmolLM2 with 4 candidates a prompt: best achievable 0.576)


@dataclass
class StudyPlan:
    """What the study adds to the demo's settings (``cluster.recipes.demo.TINY`` / ``FULL``)."""
    eval_prompts: int         # held-out prompts (never trained on, sampled for pairs or searched by MPO)
    eval_samples: int         # answers per held-out prompt and policy
    eval_max_new_tokens: int  # evaluation's cap: at most 5% of the base's answers reach it (SmolLM2, 1024: 4.3%)
    seeds: Tuple[int, ...]    # training seeds of the per-objective DPO policies and of ls-0.5
    batch: int = 64           # rows the serving engine decodes at once during evaluation
    workers: int = 2          # evaluation passes decoded side by side (the CPUs' torch threads split among them)
    resamples: int = 1000     # paired bootstrap resamples over prompts
    level: float = 0.95


PLANS = {True: StudyPlan(eval_prompts=48, eval_samples=1, eval_max_new_tokens=64, seeds=(0, 1)),
         False: StudyPlan(eval_prompts=256, eval_samples=1, eval_max_new_tokens=1024, seeds=(0, 1, 2))}


# -- data ------------------------------------------------------------------------------------

def read_candidates(path: str) -> Tuple[List[str], List[List[str]], Dict[str, np.ndarray]]:
    """``candidates.jsonl`` (``moray pairs``) -> prompts, responses and ``{objective: (prompts, n)}``
    scores (NaN where a sample could not be scored)."""
    prompts, responses, scores = [], [], {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        p = r["prompt"]
        prompts.append(p[-1]["content"] if isinstance(p, list) else p)
        responses.append(r["responses"])
    for k in rows[0]["scores"]:
        scores[k] = np.array([[np.nan if v is None else v for v in r["scores"][k]] for r in rows], dtype=np.float64)
    return prompts, responses, scores


def scalarised_pairs(candidates: str, weights: Dict[str, float], out: str) -> Tuple[str, int]:
    """Best vs worst per prompt under ``Σ_k w_k z_k`` (:func:`reward_models.pairs.scalarise`):
    the linear-scalarisation baseline's DPO data. Returns the file and its pair count."""
    prompts, responses, scores = read_candidates(candidates)
    pairs = best_vs_worst(prompts, responses, list(scalarise(scores, weights)))
    for p in pairs:
        p["prompt"] = [{"role": "user", "content": p["prompt"]}]
    return write_jsonl(out, pairs), len(pairs)


# -- sampling for evaluation -----------------------------------------------------------------

class SharedPass:
    """Weight vectors over the same policies, sampled together through the serving engine in this
    process (:func:`serving.engine_sampling.engine_sample_vectors`, the sampling path the Serve app
    runs, seeded per answer): the rows of every vector share the batches, so a sweep pays one
    pass's tail of long answers instead of one per vector."""

    def __init__(self, policies: Dict[str, str], vectors: Dict[str, Dict[str, float]], batch: int,
                 mixing: str = "logits"):
        self.policies, self.vectors, self.batch, self.mixing = dict(policies), dict(vectors), batch, mixing

    @classmethod
    def single(cls, name: str, path: str, batch: int) -> "SharedPass":
        return cls({name: path}, {name: {name: 1.0}}, batch)

    def sample(self, prompts: Sequence[str], n: int, s, threads: int) -> Dict[str, Samples]:
        got = engine_sample_vectors(self.policies, list(self.vectors.values()), prompts, n, s.max_new_tokens, s.seed,
                                    s.temperature, s.top_k, mixing=self.mixing, batch=self.batch, threads=threads)
        return dict(zip(self.vectors, got))


class Slots:
    """``n`` slots taken in turn: the pass started ``i``-th waits for its turn and for ``need`` free
    slots. A pass of several models (MPO's mixes: a KV cache per model) takes them all and runs alone,
    since beside another pass it outgrew this machine's memory; the turn keeps later one-slot passes
    from starving it."""

    def __init__(self, n: int):
        self.n, self.free, self.turn = n, n, 0
        self.cv = threading.Condition()

    def run(self, i: int, need: int, fn: Callable, *args):
        need = min(need, self.n)
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i and self.free >= need)
            self.free -= need
            self.turn += 1
            self.cv.notify_all()
        try:
            return fn(*args)
        finally:
            with self.cv:
                self.free += need
                self.cv.notify_all()


class Ahead:
    """The passes behind ``sources`` (name -> its pass) decoded in order, ``workers`` slots at a time
    (a pass takes one per model it loads), while evaluation scores the answers already made: one
    pass's tail of a few long answers, which keeps a core idle, decodes beside the next pass.
    ``sampler(name)`` waits for its pass."""

    def __init__(self, sources: Dict[str, SharedPass], prompts: Sequence[str], s, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        before_threads()
        per_slot = max(1, len(os.sched_getaffinity(0)) // workers)  # this process's CPUs, split
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="moray-eval")
        slots = Slots(workers)
        passes = {id(q): q for q in sources.values()}
        self.futures = {}
        for i, (k, q) in enumerate(passes.items()):
            need = min(len(q.policies), workers)
            self.futures[k] = self.pool.submit(slots.run, i, need, q.sample, prompts, s.samples, s, per_slot * need)
        self.of = {name: id(q) for name, q in sources.items()}

    def sampler(self, name: str) -> Callable:
        return lambda prompts, n, s: self.futures[self.of[name]].result()[name]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- the study -------------------------------------------------------------------------------

def run_study(tiny: bool = False, out: str = "moray_runs/study", workers: Optional[int] = None,
              zero_stage: int = 2, docs: Optional[str] = None) -> Dict[str, Any]:
    """Run (or, in a directory where ``moray demo``/``moray study`` already ran with the same
    settings, finish) the study; write ``study.md``, ``study.json`` and ``study.png`` to ``out``
    (and, with ``docs``, copy them there as ``study-smollm2.*`` / ``study-tiny.*``)."""
    plan = PLANS[tiny]
    if docs:  # made (or refused) now, not after hours of work
        Path(docs).mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    p = pipeline(tiny, out, workers, zero_stage, plan.eval_prompts)
    s, root, steps = p.s, p.root, p.steps
    both = [f"dpo-{k}" for k in OBJECTIVES]
    method: Dict[str, str] = {"base": "base"}
    weights: Dict[str, Dict[str, float]] = {}
    needs: Dict[str, List[str]] = {}              # the policies a mix or fusion is made of
    samples: Dict[str, int] = {}                  # samples generated for its own data
    same: Dict[str, str] = {}                     # a policy that is another one: evaluated once
    sources: Dict[str, Any] = {"base": p.base}
    pair_samples = len(p.train_prompts) * s.samples

    per_objective = {k: p.dpo(k) for k in OBJECTIVES}
    for k in OBJECTIVES:
        sources[f"dpo-{k}"], method[f"dpo-{k}"] = per_objective[k], "DPO (one objective)"
    for w in WEIGHTS:
        ws = {"sentiment": w, "conciseness": 1 - w}
        for kind in ("ls", "pgapo", "soup", "mpo", "conditioned"):
            weights[f"{kind}-{w}"] = ws
        sources[f"ls-{w}"], method[f"ls-{w}"] = linear_scalarisation(p, w), RETRAINING
    sources["gapo"], method["gapo"] = p.gapo(), "GAPO"
    for w in WEIGHTS:
        method[f"pgapo-{w}"] = "P-GAPO"
        if w == 0.5:  # P-GAPO at (1/2, 1/2) is GAPO (p = 1, K = 2: the min-norm point of two unit vectors is their midpoint)
            same[f"pgapo-{w}"], needs[f"pgapo-{w}"] = "gapo", ["gapo"]
        else:
            sources[f"pgapo-{w}"] = p.gapo(f"pgapo-{w}", weights[f"pgapo-{w}"])
    for thr in MOPO_THRESHOLDS:
        sources[f"mopo-{thr}"], method[f"mopo-{thr}"] = p.mopo(thr), "MOPO"

    n_wrpo = max(2, s.samples // 2)
    wrpo = steps("data wrpo", lambda: make_wrpo_pairs(
        p.base, list(per_objective.values()), p.train_prompts, list(OBJECTIVES), n_wrpo, str(root / "data" / "wrpo"),
        seed=4, weights={"sentiment": 0.5, "conciseness": 0.5}, **p.sampling))
    log.info("study: %d WRPO rows (base as target, both DPO policies as sources)", wrpo["count"])
    sources["wrpo"] = p.fit("wrpo", JOBS["wrpo"], wrpo["wrpo"], objective="sentiment+conciseness")
    method["wrpo"], needs["wrpo"] = "WRPO", both
    samples["wrpo"] = len(p.train_prompts) * n_wrpo * (1 + len(per_objective))

    for w in WEIGHTS:  # post-hoc mixes of the two DPO policies
        name = f"soup-{w}"
        sources[name] = steps(name, lambda: soup_policies(per_objective, [w, 1 - w], str(root / "policies" / name)))
        method[name], needs[name] = "Personalized Soups", both
    mpo = p.mpo_weights(per_objective)
    weights["mpo-maxmin"] = mpo["weights"]
    samples["mpo-maxmin"] = s.mpo_prompts * 4
    mpo_names = [f"mpo-{w}" for w in WEIGHTS] + ["mpo-maxmin"]
    mixes = SharedPass(per_objective, {n: weights[n] for n in mpo_names}, plan.batch)
    for name in mpo_names:
        sources[name], method[name], needs[name] = mixes, "MPO logits mixing", both
    vertices = conditioned(p)  # one trained model, served at each w as `moray serve` does (per-row LoRA soup)
    sweep = SharedPass(vertices, {f"conditioned-{w}": weights[f"conditioned-{w}"] for w in WEIGHTS}, plan.batch, "soup")
    for w in WEIGHTS:
        name = f"conditioned-{w}"
        sources[name], method[name], needs[name] = sweep, "preference-conditioned", ["conditioned"]

    replicates = seed_replicates(p, plan.seeds)  # training noise: the same jobs with other seeds
    constraints = {n: policy_constraints(sources[n]) for n, m in method.items() if m == "MOPO"}
    passes = {k: SharedPass.single(k, v, plan.batch) if isinstance(v, str) else v
              for k, v in {**sources, **replicates}.items()}
    scored, eval_seconds = evaluate_all(p, plan, passes)
    results = {n: dict(scored[same.get(n, n)]) for n in method}

    def cost(name: str) -> Tuple[float, int]:
        """Seconds and samples from the base: the shared pair sampling, its own data, training or
        mixing, and the policies it is made of."""
        if name == "base":
            return 0.0, 0
        own = steps.seconds(name) + steps.seconds(f"data {name}")
        return (steps.seconds("pairs") + own + sum(steps.seconds(q) for q in needs.get(name, [])),
                pair_samples + samples.get(name, 0))

    for name, r in results.items():
        r.update(method=method[name], weights=weights.get(name))
        if name in constraints:
            r["constraints"] = constraints[name]
        r["cost_s"], r["cost_samples"] = cost(name)
    groups: Dict[str, List[str]] = {}
    for n, r in results.items():
        groups.setdefault(r["method"], []).append(n)

    def group_cost(names: List[str]) -> float:  # every step behind a method's policies, shared ones once
        behind = set(names) | {q for n in names for q in needs.get(n, [])}
        return steps.seconds("pairs") + sum(steps.seconds(x) + steps.seconds(f"data {x}") for x in behind)

    reference = (-1.0, -float(plan.eval_max_new_tokens))
    doc = {"task": "sentiment + conciseness", "model": "tiny" if tiny else "SmolLM2-135M-Instruct", "base": p.base,
           "settings": {**asdict(s), **asdict(plan), "weights": list(WEIGHTS),
                        "mopo_thresholds": list(MOPO_THRESHOLDS)},
           "prompts": p.split.record(), "mpo_search_prompts": len(p.mpo_prompts()),
           "reference_point": {"sentiment": reference[0], "conciseness": reference[1]},
           "policies": results, "mpo_maxmin_weights": mpo["weights"],
           "eval_seconds": eval_seconds, "eval_tokens_per_s": sum(scored[n].get("tokens", 0) for n in scored) / eval_seconds,
           "steps_seconds": {k: steps.seconds(k) for k in steps.done}}
    doc.update(compare(results, groups, {g: group_cost(n) if g != "base" else 0.0 for g, n in groups.items()},
                       reference, plan))
    doc["seeds"] = seed_report({n: scored[n] for n in scored if n not in method}, results, plan.seeds, reference)
    doc["seconds"] = time.perf_counter() - tic
    write_json(str(root / "study.json"), doc)
    plot_study(doc, str(root / "study.png"), title=f"moray study{' --tiny' if tiny else ''}")
    (root / "study.md").write_text(format_study(doc))
    if docs:
        for ext in ("md", "json", "png"):
            shutil.copyfile(root / f"study.{ext}", Path(docs) / f"study-{'tiny' if tiny else 'smollm2'}.{ext}")
    print(format_study(doc))
    return doc


def linear_scalarisation(p, w: float, seed: int = 0) -> str:
    """DPO on the pairs labelled by ``w z_sentiment + (1 - w) z_conciseness`` (per-weight retraining)."""
    ws = {"sentiment": w, "conciseness": 1 - w}
    data = p.steps(f"data ls-{w}", lambda: scalarised_pairs(p.made["candidates"], ws,
                                                             str(p.root / "data" / f"pairs_ls_{w}.jsonl")))
    log.info("study: %d linear-scalarisation pairs at w_sentiment=%s", data[1], w)
    name = f"ls-{w}" + (f"-seed{seed}" if seed else "")
    return p.fit(name, JOBS["dpo"], data[0], objective=f"ls-{w}", **({"train.seed": seed} if seed else {}))


def evaluate_all(p, plan: StudyPlan, sources: Dict[str, SharedPass]) -> Tuple[Dict[str, Dict[str, Any]], float]:
    """Every source's scores on the held-out prompts and the evaluation's seconds. Each policy's
    evaluation is a step of ``<out>/eval/steps.json``: an interrupted study resumes at the next one."""
    settings = EvalSettings(samples=plan.eval_samples, max_new_tokens=plan.eval_max_new_tokens, seed=2)
    (p.root / "eval").mkdir(exist_ok=True)
    done = Steps(p.root / "eval", json.loads(json.dumps({"run": p.steps.settings, "plan": asdict(plan)})))
    todo = {k: v for k, v in sources.items() if k not in done.done}
    log.info("study: evaluating %d policies and mixes (%d done before) on %d held-out prompts x %d samples "
             "(up to %d new tokens), %d passes side by side", len(todo), len(sources) - len(todo),
             len(p.eval_prompts), plan.eval_samples, plan.eval_max_new_tokens, plan.workers)
    clock = [time.perf_counter()]

    def record(name: str, result: Dict[str, Any]) -> None:
        now = time.perf_counter()
        done.record(name, now - clock[0], result)
        clock[0] = now

    if todo:
        ahead = Ahead(todo, p.eval_prompts, settings, plan.workers)
        try:
            evaluate({k: ahead.sampler(k) for k in todo}, p.eval_prompts, OBJECTIVES, p.base, settings,
                     on_policy=record)
        finally:
            ahead.close()
    return {k: done.done[k]["result"] for k in sources}, sum(done.seconds(k) for k in sources)


def conditioned(p) -> Dict[str, str]:
    """The preference-conditioned policy (``moray train conditioned``, one job on the pairs labelled
    by both objectives) as its vertices, ``{objective: adapter directory}``: the engine serves any
    λ from them (docs/algorithms.md §9)."""
    from trainers.jobs.conditioned import VERTICES_DIR

    model = p.fit("conditioned", JOBS["conditioned"], p.made["pairs_multi"], objectives=list(OBJECTIVES),
                  **{"train.zero_stage": min(p.train["train.zero_stage"], 2), "train.lr": p.s.adapter_lr})
    return {k: str(Path(model) / VERTICES_DIR / k) for k in OBJECTIVES}


def seed_replicates(p, seeds: Sequence[int]) -> Dict[str, str]:
    """The two per-objective DPO policies and linear scalarisation at 0.5, trained again with each
    seed after the first (same data): ``{name-seedN: policy directory}``."""
    out: Dict[str, str] = {}
    for seed in seeds[1:]:
        for k in OBJECTIVES:
            name = f"dpo-{k}-seed{seed}"
            out[name] = p.fit(name, JOBS["dpo"], p.made["pairs"][k], objective=k, **{"train.seed": seed})
        out[f"ls-0.5-seed{seed}"] = linear_scalarisation(p, 0.5, seed)
    return out
