"""The study's prompt split and its comparisons, from per-prompt scores made here (no training)."""

import numpy as np
import pytest

from cluster.recipes.demo import FULL, TINY, Pipeline, prompts_for
from cluster.recipes.study import PLANS
from cluster.recipes.study_report import RETRAINING, compare, format_study, plot_study, seed_report
from reward_models.evaluate import hypervolume
from reward_models.prompts import POOLS, prompt_split


@pytest.mark.parametrize("tiny", [True, False])
def test_held_out_prompts_are_disjoint_from_every_prompt_trained_sampled_or_searched_on(tiny):
    s, plan = (TINY if tiny else FULL), PLANS[tiny]
    p = Pipeline(s, None, None, "", prompts_for(s, plan.eval_prompts), {}, {}, {}, 1)
    held = set(p.eval_prompts)
    assert len(held) == len(p.eval_prompts) == plan.eval_prompts and (tiny or len(held) >= 256)
    for used in (p.train_prompts, p.mpo_prompts()):  # pairs, training and WRPO's samples; MPO's weight search
        assert used and not held & set(used)
    assert p.train_prompts == prompts_for(s, 16).train  # the demo's split trains on the same prompts
    record = p.split.record()
    topics, forms = POOLS[s.prompt_pool]
    assert (record["topics"], record["question_forms"], record["pool"]) == (len(topics), len(forms), len(set(
        a.format(t=t) for t in topics for a in forms))) == ((24, 6, 144) if tiny else (48, 16, 768))
    assert record["heldout"] == p.eval_prompts and record["train"] == p.train_prompts
    with pytest.raises(ValueError, match="pool has"):
        prompt_split(record["pool"], 1, pool=s.prompt_pool)


def results_for(points, rng, prompts=40):
    """Per-policy results as ``reward_models.evaluate`` writes them, around the given means."""
    out = {}
    for name, (method, sent, length) in points.items():
        pp = np.stack([sent + rng.normal(0, 0.2, prompts), -length + rng.normal(0, 3, prompts)], 1)
        out[name] = {"method": method, "cost_s": 10.0, "cost_samples": 1, "empty_fraction": 0.0, "capped_fraction": 0.1,
                     "per_prompt": {"sentiment": pp[:, 0].tolist(), "conciseness": pp[:, 1].tolist()},
                     "objectives": {k: {"mean": float(pp[:, i].mean()), "ci95": 0.1} for i, k in
                                    enumerate(("sentiment", "conciseness"))}}
    return out


def test_compare_marks_a_method_that_beats_retraining_and_reports_the_seeds(tmp_path):
    rng = np.random.default_rng(0)
    pts = {"base": ("base", 0.0, 50), "dpo-sentiment": ("DPO (one objective)", 0.6, 60),
           "dpo-conciseness": ("DPO (one objective)", -0.1, 20), "ls-0.5": (RETRAINING, 0.2, 40),
           "mpo-0.5": ("MPO logits mixing", 0.5, 25)}
    results = results_for(pts, rng)
    groups = {}
    for n, r in results.items():
        groups.setdefault(r["method"], []).append(n)
    costs = {"base": 0.0, "DPO (one objective)": 20.0, RETRAINING: 40.0, "MPO logits mixing": 10.0}
    ref = (-1.0, -100.0)
    got = compare(results, groups, costs, ref, PLANS[True])
    m = got["methods"]
    assert m["MPO logits mixing"]["difference_excludes_0"] and m["MPO logits mixing"]["difference_ci95"][0] > 0
    assert not m[RETRAINING]["difference_excludes_0"] and m[RETRAINING]["difference"] == 0
    assert got["mpo_headline"]["cost_fraction"] == 0.25 and got["mpo_headline"]["ci95"][0] > 1
    assert got["hypervolume_all"] == pytest.approx(hypervolume([[r["objectives"][k]["mean"] for k in
                                                                 ("sentiment", "conciseness")] for r in results.values()], ref))
    reps = results_for({f"{n}-seed1": pts[n] for n in ("dpo-sentiment", "dpo-conciseness", "ls-0.5")}, rng)
    seeds = seed_report(reps, results, (0, 1), ref)
    assert seeds["dpo_pair_hypervolume_spread"]["seeds"] == 2 and len(seeds["dpo_pair_hypervolume"]) == 2
    doc = {"model": "tiny", "settings": {"eval_samples": 1, "resamples": 1000}, "prompts": prompt_split(3, 40).record(),
           "mpo_search_prompts": 2, "reference_point": {"sentiment": -1.0, "conciseness": -100.0}, "policies": results,
           "mpo_maxmin_weights": {"sentiment": 0.5, "conciseness": 0.5}, "seeds": seeds, **got}
    text = format_study(doc)
    assert "| MPO logits mixing | 1 |" in text and "† |" in text and "of retraining's" in text and "seeds 0, 1" in text
    assert "| ls-0.5 | linear scalarisation (DPO) | " in text and "| 10% |" in text
    print(text)
    png = plot_study(doc, str(tmp_path / "s.png"), "test")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
