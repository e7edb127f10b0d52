"""``moray study``: every Moray method on the demo task, side by side.

Sentiment and conciseness on SmolLM2-135M-Instruct (``--tiny``: the demo's tiny model). From one
set of on-policy samples of the base model it produces

- the base; one DPO policy per objective;
- linear scalarisation: DPO on pairs labelled by ``Σ_k w_k z_k`` (each objective's score
  standardised over the samples) for w_sentiment ∈ {0.25, 0.5, 0.75};
- MPO logits mixing of the two DPO policies at the same w and at the BSMD max-min weights;
  Personalized Soups at the same w;
- GAPO; P-GAPO with preference (w, 1 − w) at the same w; MOPO (conciseness maximised, sentiment
  win-rate held at two thresholds); WRPO with the two DPO policies as sources and the base as
  target;

scores every one on the same held-out prompts (:mod:`reward_models.evaluate`), and writes
``study.md`` (a table), ``study.json`` and ``study.png`` (objective space, Pareto front).
Cost is the wall-clock seconds to produce a policy from the base, counting the shared sampling of
training data, its own data and training, its mixing, and the per-objective policies it mixes
or fuses. Hypervolume is taken per method over its points against the fixed reference
(sentiment −1, length ``max_new_tokens``): the worst any policy can score.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cluster.recipes.demo import OBJECTIVES, constraints_text, pipeline, policy_constraints
from reward_models.evaluate import EvalSettings, evaluate, hypervolume, pareto_mask, plot, write_json
from reward_models.pairs import best_vs_worst, make_wrpo_pairs, scalarise, write_jsonl
from reward_models.sampling import Generate
from serving.decode import LockstepDecoder, Row, Sampling
from serving.offline.soup import soup_policies
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.prompts import ask, encode
from trainers.jobs import JOBS

log = logging.getLogger(__name__)

WEIGHTS = (0.25, 0.5, 0.75)           # w_sentiment; w_conciseness = 1 - w
MOPO_THRESHOLDS = (0.5, 0.55)         # sentiment win-rate against the base's own samples (0.6 is infeasible for
                                      # SmolLM2 with 4 candidates a prompt: best achievable 0.576)


@dataclass
class StudyPlan:
    """What the study adds to the demo's settings (``cluster.recipes.demo.TINY`` / ``FULL``)."""
    eval_prompts: int
    eval_samples: int
    in_process: bool  # sample for evaluation in this process (tiny) or on Ray Data actors


PLANS = {True: StudyPlan(eval_prompts=32, eval_samples=2, in_process=True),
         False: StudyPlan(eval_prompts=32, eval_samples=2, in_process=False)}


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

def local_sampler(path: str, max_new_tokens: int) -> Callable:
    """Samples from a policy directory in this process (``reward_models.sampling.Generate``)."""
    def sample(prompts: Sequence[str], n: int, s) -> List[List[str]]:
        gen = Generate(path, n, max_new_tokens, s.temperature, 1.0, s.seed, threads=2, top_k=s.top_k)
        out: List[List[str]] = []
        for i in range(0, len(prompts), 16):
            chunk = list(prompts[i:i + 16])
            got = gen({"prompt": np.array(chunk, dtype=object), "row": np.arange(i, i + len(chunk))})
            out += [json.loads(r) for r in got["responses"]]
        return out
    return sample


def logits_sampler(policies: Dict[str, str], weights: Dict[str, float], max_new_tokens: int) -> Callable:
    """Samples from the MPO per-token mixture ``softmax(Σ_k w_k logits_k)`` of ``policies``
    (:class:`serving.decode.LockstepDecoder`, the decoder the Serve app runs), seeded per row."""
    def sample(prompts: Sequence[str], n: int, s) -> List[List[str]]:
        torch.set_num_threads(2)
        names = list(policies)
        tok = load_tokenizer(policies[names[0]])
        models = [load_causal_lm(policies[k]).eval() for k in names]
        eos = {tok.eos_token_id} | set(np.atleast_1d(getattr(models[0].generation_config, "eos_token_id", None) or []))
        dec = LockstepDecoder(models, tok.pad_token_id, sorted(e for e in eos if e is not None))
        w = [weights.get(k, 0.0) for k in names]
        rows = []
        for i, p in enumerate(prompts):
            ids = encode(tok, ask(tok, p))
            rows += [Row(ids, w, Sampling(max_tokens=max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                          seed=s.seed * 1_000_003 + i * n + j)) for j in range(n)]
        out = []
        for b in range(0, len(rows), 32):
            out += dec.generate(rows[b:b + 32])
        texts = [tok.decode(t, skip_special_tokens=True) for t in out]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
    return sample


# -- the study -------------------------------------------------------------------------------

def run_study(tiny: bool = False, out: str = "moray_runs/study", workers: Optional[int] = None,
              zero_stage: int = 2) -> Dict[str, Any]:
    """Run (or, in a directory where ``moray demo``/``moray study`` already ran with the same
    settings, finish) the study; write ``study.md``, ``study.json`` and ``study.png`` to ``out``."""
    plan = PLANS[tiny]
    tic = time.perf_counter()
    p = pipeline(tiny, out, workers, zero_stage, plan.eval_prompts)
    s, root, steps = p.s, p.root, p.steps
    both = [f"dpo-{k}" for k in OBJECTIVES]
    method: Dict[str, str] = {"base": "base"}
    weights: Dict[str, Dict[str, float]] = {}
    needs: Dict[str, List[str]] = {}              # the policies a mix or fusion is made of
    samples: Dict[str, int] = {}                  # samples generated for its own data
    sources: Dict[str, Any] = {"base": p.base}
    pair_samples = len(p.train_prompts) * s.samples

    per_objective = {k: p.dpo(k) for k in OBJECTIVES}
    for k in OBJECTIVES:
        sources[f"dpo-{k}"], method[f"dpo-{k}"] = per_objective[k], "DPO (one objective)"
    for w in WEIGHTS:
        ws = {"sentiment": w, "conciseness": 1 - w}
        for kind in ("ls", "pgapo", "soup", "mpo"):
            weights[f"{kind}-{w}"] = ws
        data = steps(f"data ls-{w}", lambda: scalarised_pairs(p.made["candidates"], ws,
                                                               str(root / "data" / f"pairs_ls_{w}.jsonl")))
        log.info("study: %d linear-scalarisation pairs at w_sentiment=%s", data[1], w)
        sources[f"ls-{w}"] = p.fit(f"ls-{w}", JOBS["dpo"], data[0], objective=f"ls-{w}")
        method[f"ls-{w}"] = "linear scalarisation (DPO)"
    sources["gapo"], method["gapo"] = p.gapo(), "GAPO"
    for w in WEIGHTS:
        sources[f"pgapo-{w}"], method[f"pgapo-{w}"] = p.gapo(f"pgapo-{w}", weights[f"pgapo-{w}"]), "P-GAPO"
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
    for name in [f"mpo-{w}" for w in WEIGHTS] + ["mpo-maxmin"]:
        sources[name] = logits_sampler(per_objective, weights[name], s.max_new_tokens)
        method[name], needs[name] = "MPO logits mixing", both

    constraints = {n: policy_constraints(sources[n]) for n, m in method.items() if m == "MOPO"}
    if plan.in_process:
        sources = {k: local_sampler(v, s.max_new_tokens) if isinstance(v, str) else v for k, v in sources.items()}
    settings = EvalSettings(samples=plan.eval_samples, max_new_tokens=s.max_new_tokens, seed=2, actors=p.cpus)
    log.info("study: evaluating %d policies and mixes on %d held-out prompts x %d samples", len(sources),
             len(p.eval_prompts), plan.eval_samples)
    results = evaluate(sources, p.eval_prompts, OBJECTIVES, p.base, settings)

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
    reference = (-1.0, -float(s.max_new_tokens))
    points = {n: (r["objectives"]["sentiment"]["mean"], r["objectives"]["conciseness"]["mean"]) for n, r in results.items()}
    on_front = dict(zip(results, pareto_mask(np.array(list(points.values())))))
    groups: Dict[str, List[str]] = {}
    for n, r in results.items():
        groups.setdefault(r["method"], []).append(n)
    def group_cost(names: List[str]) -> float:  # every step behind a method's policies, shared ones once
        behind = set(names) | {q for n in names for q in needs.get(n, [])}
        return steps.seconds("pairs") + sum(steps.seconds(x) + steps.seconds(f"data {x}") for x in behind)

    summary = {g: {"policies": names, "hypervolume": hypervolume([points[n] for n in names], reference),
                   "cost_s": group_cost(names) if g != "base" else 0.0} for g, names in groups.items()}
    doc = {"task": "sentiment + conciseness", "model": "tiny" if tiny else "SmolLM2-135M-Instruct", "base": p.base,
           "settings": {**asdict(s), "eval_prompts": plan.eval_prompts, "eval_samples": plan.eval_samples,
                        "weights": list(WEIGHTS), "mopo_thresholds": list(MOPO_THRESHOLDS)},
           "reference_point": {"sentiment": reference[0], "conciseness": reference[1]},
           "hypervolume_all": hypervolume(list(points.values()), reference),
           "pareto_front": [n for n, m in on_front.items() if m], "methods": summary,
           "policies": results, "mpo_maxmin_weights": mpo["weights"], "seconds": time.perf_counter() - tic,
           "steps_seconds": {k: steps.seconds(k) for k in steps.done}}
    write_json(str(root / "study.json"), doc)
    plot(results, list(OBJECTIVES), str(root / "study.png"), groups={n: r["method"] for n, r in results.items()},
         transform={"conciseness": lambda v: -v}, labels={"sentiment": "mean sentiment (VADER compound), higher is better",
                                                           "conciseness": "mean length (tokens), lower is better"},
         title=f"moray study{' --tiny' if tiny else ''}: {len(results)} policies on held-out prompts")
    (root / "study.md").write_text(format_study(doc))
    print(format_study(doc))
    return doc


def format_study(doc: Dict[str, Any]) -> str:
    """The study as a markdown table: one row per policy, then one per method."""
    s = doc["settings"]
    lines = [f"Held-out prompts: {s['eval_prompts']} x {s['eval_samples']} samples; model {doc['model']}; "
             f"95% intervals over prompts; * on the Pareto front of all policies. Hypervolume against "
             f"(sentiment {doc['reference_point']['sentiment']:g}, length {-doc['reference_point']['conciseness']:g} tokens). "
             f"Cost: from the base model, including the shared pair sampling and the policies a mix is made of.", "",
             "| policy | method | mean sentiment | mean length (tokens) | empty | cost (s) | samples | constraints |",
             "|---|---|---|---|---|---|---|---|"]
    front = set(doc["pareto_front"])
    for name, r in doc["policies"].items():
        o = r["objectives"]
        lines.append(f"| {name}{' *' if name in front else ''} | {r['method']} | {o['sentiment']['mean']:.3f} ± "
                     f"{o['sentiment']['ci95']:.3f} | {-o['conciseness']['mean']:.1f} ± {o['conciseness']['ci95']:.1f} | "
                     f"{r['empty_fraction']:.0%} | {r['cost_s']:.0f} | {r['cost_samples']} | "
                     f"{constraints_text(r['constraints']) if 'constraints' in r else ''} |")
    lines += ["", "| method | policies | hypervolume | cost (s, all its policies, shared work once) |", "|---|---|---|---|"]
    for g, m in doc["methods"].items():
        lines.append(f"| {g} | {len(m['policies'])} | {m['hypervolume']:.2f} | {m['cost_s']:.0f} |")
    lines.append(f"| all | {len(doc['policies'])} | {doc['hypervolume_all']:.2f} | |")
    w = doc["mpo_maxmin_weights"]
    lines += ["", "MPO max-min weights: " + ", ".join(f"{k} {v:.3f}" for k, v in w.items())]
    return "\n".join(lines) + "\n"
