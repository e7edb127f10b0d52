"""The study's comparisons and how they are shown: paired bootstrap intervals on every method's
hypervolume and on its difference from per-weight retraining, the seed spread beside them, the
markdown tables and the plot (docs/algorithms.md, "Comparing methods")."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from cluster.recipes.demo import OBJECTIVES, constraints_text
from reward_models.evaluate import hypervolume, pareto_mask, save_figure
from reward_models.intervals import compare_methods, seed_spread

RETRAINING = "linear scalarisation (DPO)"  # per-weight retraining: the baseline every method is compared with
MPO = "MPO logits mixing"
SEEDED = ("dpo-sentiment", "dpo-conciseness", "ls-0.5")


def point(r: Mapping[str, Any]) -> List[float]:
    return [r["objectives"][k]["mean"] for k in OBJECTIVES]


def per_prompt(r: Mapping[str, Any]) -> np.ndarray:
    """``(prompts, objectives)`` per-prompt means, NaN where no answer was scored."""
    return np.array([[np.nan if v is None else v for v in r["per_prompt"][k]] for k in OBJECTIVES]).T


def compare(results: Mapping[str, Mapping[str, Any]], groups: Mapping[str, List[str]],
            costs: Mapping[str, float], reference: Sequence[float], plan) -> Dict[str, Any]:
    """The front of all policies, and per method its hypervolume, cost and the paired bootstrap
    comparison with retraining (:func:`reward_models.intervals.compare_methods`)."""
    names = list(results)
    pts = np.array([point(results[n]) for n in names])
    methods = compare_methods({n: per_prompt(results[n]) for n in names}, groups, reference, RETRAINING,
                              plan.resamples, seed=7, level=plan.level)
    for g, m in methods.items():
        m.update(policies=list(groups[g]), cost_s=costs[g], cost_fraction=costs[g] / costs[RETRAINING])
    mpo = methods.get(MPO)
    headline = {"hypervolume_fraction": mpo["ratio"], "ci95": mpo["ratio_ci95"],
                "cost_fraction": mpo["cost_fraction"]} if mpo else None
    return {"pareto_front": [n for n, m in zip(names, pareto_mask(pts)) if m],
            "hypervolume_all": hypervolume(pts, reference), "methods": methods, "mpo_headline": headline}


def seed_report(replicates: Mapping[str, Mapping[str, Any]], results: Mapping[str, Mapping[str, Any]],
                seeds: Sequence[int], reference: Sequence[float]) -> Dict[str, Any]:
    """Training noise: each seeded policy's scores across ``seeds`` (the first is the study's own
    policy) and the DPO pair's hypervolume per seed, with their spread."""
    def of(name: str, seed: int) -> Mapping[str, Any]:
        return results[name] if seed == seeds[0] else replicates[f"{name}-seed{seed}"]

    policies = {n: {k: seed_spread([of(n, s)["objectives"][k]["mean"] for s in seeds]) for k in OBJECTIVES}
                for n in SEEDED}
    pair = [hypervolume([point(of("dpo-sentiment", s)), point(of("dpo-conciseness", s))], reference) for s in seeds]
    return {"seeds": list(seeds), "policies": policies, "dpo_pair_hypervolume": pair,
            "dpo_pair_hypervolume_spread": seed_spread(pair)}


def format_study(doc: Dict[str, Any]) -> str:
    """The study as markdown: how it was run, one row per policy, one per method, the training noise."""
    s, pr = doc["settings"], doc["prompts"]
    cap = -doc["reference_point"]["conciseness"]
    lines = [f"Model {doc['model']}. Held-out prompts: {len(pr['heldout'])} x {s['eval_samples']} samples, from a pool of "
             f"{pr['pool']} ({pr['topics']} topics x {pr['question_forms']} question forms) split by seed {pr['seed']}; "
             f"{len(pr['train'])} other prompts gave the training pairs and WRPO's samples, and the first "
             f"{doc['mpo_search_prompts']} of them MPO's weight search. Answers up to {cap:g} new tokens (\"at cap\": "
             f"the share that reached it). ± is the 95% interval over prompts; * on the Pareto front of all policies. "
             f"Hypervolume against (sentiment {doc['reference_point']['sentiment']:g}, length {cap:g} tokens), with a "
             f"paired bootstrap over prompts ({s['resamples']} resamples, the same for every method). Cost: from the "
             f"base model, including the shared pair sampling and the policies a mix is made of.", "",
             "| policy | method | mean sentiment | mean length (tokens) | at cap | empty | cost (s) | samples | constraints |",
             "|---|---|---|---|---|---|---|---|---|"]
    front = set(doc["pareto_front"])
    for name, r in doc["policies"].items():
        o = r["objectives"]
        lines.append(f"| {name}{' *' if name in front else ''} | {r['method']} | {o['sentiment']['mean']:.3f} ± "
                     f"{o['sentiment']['ci95']:.3f} | {-o['conciseness']['mean']:.1f} ± {o['conciseness']['ci95']:.1f} | "
                     f"{r.get('capped_fraction', float('nan')):.0%} | {r['empty_fraction']:.0%} | {r['cost_s']:.0f} | "
                     f"{r['cost_samples']} | {constraints_text(r['constraints']) if 'constraints' in r else ''} |")
    lines += ["", "| method | policies | hypervolume [95%] | minus retraining's [95%] | fraction of retraining's [95%] "
                  "| cost (s) | cost / retraining's |", "|---|---|---|---|---|---|---|"]
    for g, m in doc["methods"].items():
        mark = " †" if m["difference_excludes_0"] else ""
        lines.append(f"| {g} | {len(m['policies'])} | {m['hypervolume']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] | "
                     f"{m['difference']:+.2f} [{m['difference_ci95'][0]:+.2f}, {m['difference_ci95'][1]:+.2f}]{mark} | "
                     f"{m['ratio']:.2f} [{m['ratio_ci95'][0]:.2f}, {m['ratio_ci95'][1]:.2f}] | {m['cost_s']:.0f} | "
                     f"{m['cost_fraction']:.2f} |")
    lines.append(f"| all | {len(doc['policies'])} | {doc['hypervolume_all']:.2f} | | | | |")
    lines += ["", f"† the difference's 95% interval excludes 0: the method's front differs from per-weight retraining's "
                  f"({RETRAINING}) beyond what the choice of prompts explains."]
    h = doc.get("mpo_headline")
    if h:
        lines.append(f"MPO logits mixing: its front's hypervolume is {h['hypervolume_fraction']:.0%} of retraining's "
                     f"(95% interval {h['ci95'][0]:.0%} to {h['ci95'][1]:.0%}) at {h['cost_fraction']:.0%} of its cost.")
    w = doc["mpo_maxmin_weights"]
    lines += ["", "MPO max-min weights: " + ", ".join(f"{k} {v:.3f}" for k, v in w.items())]
    lines += format_seeds(doc)
    return "\n".join(lines) + "\n"


def format_seeds(doc: Dict[str, Any]) -> List[str]:
    """Training noise beside the bootstrap: the seeded policies' spread, the DPO pair's hypervolume."""
    sr = doc["seeds"]
    lines = ["", f"Training noise: trained with seeds {', '.join(map(str, sr['seeds']))} on the same pairs (mean, sd and "
                 f"range over seeds; the interval over prompts is the first seed's).", "",
             "| policy | sentiment over seeds | length over seeds | sentiment ± over prompts |", "|---|---|---|---|"]
    for n, sp in sr["policies"].items():
        a, b = sp["sentiment"], sp["conciseness"]
        lines.append(f"| {n} | {a['mean']:.3f}, sd {a['sd']:.3f} [{a['min']:.3f}, {a['max']:.3f}] | {-b['mean']:.1f}, "
                     f"sd {b['sd']:.1f} [{-b['max']:.1f}, {-b['min']:.1f}] | "
                     f"± {doc['policies'][n]['objectives']['sentiment']['ci95']:.3f} |")
    hv, boot = sr["dpo_pair_hypervolume_spread"], doc["methods"]["DPO (one objective)"]["ci95"]
    seed_width, boot_width = hv["max"] - hv["min"], boot[1] - boot[0]
    lines += ["", f"DPO pair's hypervolume over seeds: {', '.join(f'{v:.2f}' for v in sr['dpo_pair_hypervolume'])} "
                  f"(range {seed_width:.2f}, sd {hv['sd']:.2f}) beside its bootstrap interval over prompts "
                  f"[{boot[0]:.2f}, {boot[1]:.2f}] (width {boot_width:.2f}): "
                  + ("training noise is the larger." if seed_width > boot_width else "the choice of prompts is the larger.")]
    return lines


def plot_study(doc: Dict[str, Any], path: str, title: str) -> str:
    """Left: every policy in objective space with its 95% intervals, each method's own front as a
    step line. Right: each method's hypervolume with its bootstrap interval, retraining's marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(14, 6), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab10")
    methods = list(doc["methods"])
    for gi, g in enumerate(methods):
        names = doc["methods"][g]["policies"]
        rs = [doc["policies"][n] for n in names]
        x = np.array([r["objectives"]["sentiment"]["mean"] for r in rs])
        y = np.array([-r["objectives"]["conciseness"]["mean"] for r in rs])
        xe = [r["objectives"]["sentiment"]["ci95"] for r in rs]
        ye = [r["objectives"]["conciseness"]["ci95"] for r in rs]
        color = cmap(gi % 10)
        ax.errorbar(x, y, xerr=np.nan_to_num(xe), yerr=np.nan_to_num(ye), fmt="o", color=color, label=g, capsize=2,
                    alpha=0.85)
        for n, xi, yi in zip(names, x, y):
            ax.annotate(n, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        on = pareto_mask(np.stack([x, -y], 1))
        if on.sum() > 1:
            fx, fy = zip(*sorted(zip(x[on], y[on])))
            ax.step(fx, fy, where="pre", color=color, lw=1, alpha=0.7)  # attainment boundary
    ax.set_xlabel("mean sentiment (VADER compound), higher is better")
    ax.set_ylabel("mean length (tokens), lower is better")
    ax.set_title(f"{title}: policies on held-out prompts, each method's front")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    hv = np.array([doc["methods"][g]["hypervolume"] for g in methods])
    lo = np.array([doc["methods"][g]["ci95"][0] for g in methods])
    hi = np.array([doc["methods"][g]["ci95"][1] for g in methods])
    ys = np.arange(len(methods))[::-1]
    hx.errorbar(hv, ys, xerr=[hv - lo, hi - hv], fmt="o", color="black", capsize=3)
    hx.axvspan(doc["methods"][RETRAINING]["ci95"][0], doc["methods"][RETRAINING]["ci95"][1], color="grey", alpha=0.2,
               label="retraining's interval")
    hx.set_yticks(ys)
    hx.set_yticklabels(methods, fontsize=7)
    hx.set_xlabel("hypervolume (95% paired bootstrap interval over prompts)")
    hx.legend(fontsize=7, loc="lower right")
    hx.grid(alpha=0.3)
    return save_figure(fig, path)
