"""`moray study --tiny` on the directory `moray demo --tiny` left (slow): it reuses the demo's
steps, trains the rest, writes the table, JSON and plot, and its fronts, hypervolumes and
costs agree with its own per-policy numbers; `moray eval` on two of its policies. The evaluation's
pass scheduler (fast)."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cluster.cli import main
from cluster.recipes.study import Slots, run_study
from reward_models.evaluate import hypervolume, pareto_mask

SHARED = ("base", "pairs", "dpo-sentiment", "dpo-conciseness", "gapo", "mopo-0.5", "mpo-maxmin")


def test_slots_run_a_many_model_pass_alone_and_in_turn():
    needs = [1, 1, 2, 1, 1, 2, 1]
    slots, lock, busy, log = Slots(2), threading.Lock(), [0], []

    def task(i, need):
        with lock:
            busy[0] += need
            log.append((i, busy[0]))
        time.sleep(0.02 * (1 + i % 3))
        with lock:
            busy[0] -= need
        return i

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(slots.run, i, need, task, i, need) for i, need in enumerate(needs)]
        assert [f.result() for f in futures] == list(range(len(needs)))
    assert [i for i, _ in log] == list(range(len(needs)))  # started in turn
    assert max(b for _, b in log) <= 2
    assert all(b == 2 for i, b in log if needs[i] == 2)  # a two-slot pass had the slots to itself


@pytest.mark.slow
def test_tiny_study_on_the_demo_directory(tiny_demo, tmp_path, capsys):
    import ray


    root = tiny_demo["dir"]
    before = json.loads((root / "steps.json").read_text())["steps"]
    assert set(SHARED) <= set(before)
    try:
        doc = run_study(tiny=True, out=str(root), docs=str(tmp_path / "docs"))  # made on the way
        table = capsys.readouterr().out
        after = json.loads((root / "steps.json").read_text())["steps"]
        assert {k: after[k] for k in SHARED} == {k: before[k] for k in SHARED}  # reused, not redone
        added = {f"{kind}-{w}" for kind in ("ls", "data ls", "soup") for w in (0.25, 0.5, 0.75)}
        added |= {"pgapo-0.25", "pgapo-0.75"}  # P-GAPO at (1/2, 1/2) is the GAPO policy
        seeded = {"dpo-sentiment-seed1", "dpo-conciseness-seed1", "ls-0.5-seed1"}
        assert set(after) - set(before) == added | seeded | {"conditioned", "mopo-0.55", "data wrpo", "wrpo"}
        evaluated = json.loads((root / "eval" / "steps.json").read_text())["steps"]
        assert set(evaluated) == set(doc["policies"]) - {"pgapo-0.5"} | seeded  # each policy once
        assert doc["eval_seconds"] == pytest.approx(sum(e["seconds"] for e in evaluated.values()))

        assert json.loads((root / "study.json").read_text()) == json.loads(json.dumps(doc, default=float))
        assert (root / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (root / "study.md").read_text() in table and "| mpo-maxmin" in table
        for ext in ("md", "json", "png"):  # --docs: the repository's copies
            assert (tmp_path / "docs" / f"study-tiny.{ext}").read_bytes() == (root / f"study.{ext}").read_bytes()
        held, train = set(doc["prompts"]["heldout"]), set(doc["prompts"]["train"])
        assert len(held) == 48 and not held & train
        assert all(0 <= r["capped_fraction"] <= 1 and len(r["per_prompt"]["sentiment"]) == 48 for r in doc["policies"].values())
        for m in doc["methods"].values():  # intervals on every method, and on its difference from retraining
            assert m["ci95"][0] <= m["ci95"][1] and m["difference_ci95"][0] <= m["difference"] <= m["difference_ci95"][1]
        assert doc["methods"]["linear scalarisation (DPO)"]["difference_ci95"] == [0.0, 0.0]
        assert doc["mpo_headline"]["cost_fraction"] > 0 and len(doc["seeds"]["dpo_pair_hypervolume"]) == 2
        assert doc["eval_tokens_per_s"] > 0
        policies = doc["policies"]
        assert len(policies) == 23 and len(doc["methods"]) == 10

        # the front and every method's hypervolume follow from the per-policy means
        names = list(policies)
        pts = np.array([[policies[n]["objectives"][k]["mean"] for k in ("sentiment", "conciseness")] for n in names])
        assert doc["pareto_front"] == [n for n, m in zip(names, pareto_mask(pts)) if m]
        ref = (-1.0, -64.0)
        assert doc["hypervolume_all"] == pytest.approx(hypervolume(pts, ref))
        for method, m in doc["methods"].items():
            assert m["hypervolume"] == pytest.approx(hypervolume(pts[[names.index(n) for n in m["policies"]]], ref))
        assert doc["hypervolume_all"] >= max(m["hypervolume"] for m in doc["methods"].values())

        # every sweep moves the right way: more sentiment weight, more positive answers
        for kind in ("ls", "pgapo", "soup", "mpo"):
            lo, hi = (policies[f"{kind}-{w}"]["objectives"]["sentiment"]["mean"] for w in (0.25, 0.75))
            assert hi > lo + 0.1, (kind, lo, hi)
        # P-GAPO at equal preference is GAPO (§5: MGDA's min-norm point of two unit vectors is their midpoint)
        assert policies["pgapo-0.5"]["objectives"] == policies["gapo"]["objectives"]
        assert policies["pgapo-0.5"]["cost_s"] == policies["gapo"]["cost_s"]
        assert policies["pgapo-0.5"]["method"] == "P-GAPO" and policies["gapo"]["method"] == "GAPO"
        for thr in ("0.5", "0.55"):  # each MOPO row carries its constraint's final estimate, met or not
            report = policies[f"mopo-{thr}"]["constraints"]["sentiment"]
            assert report["threshold"] == float(thr) and f"(threshold {float(thr):g}) {'met' if report['satisfied'] else 'NOT MET'}" in table
        soup = json.loads((root / "policies" / "soup-0.25" / "moray.json").read_text())
        assert soup["weights"] == pytest.approx({"sentiment": 0.25, "conciseness": 0.75})

        # costs: from the base, shared sampling included; a mix costs at least the policies it mixes
        pairs = after["pairs"]["seconds"]
        for n, r in policies.items():
            assert r["cost_s"] == 0 if n == "base" else r["cost_s"] >= pairs
        dpo_both = sum(after[f"dpo-{k}"]["seconds"] for k in ("sentiment", "conciseness"))
        assert policies["wrpo"]["cost_s"] == pytest.approx(pairs + dpo_both + after["wrpo"]["seconds"]
                                                           + after["data wrpo"]["seconds"])
        assert policies["mpo-0.5"]["cost_s"] == pytest.approx(pairs + dpo_both)
        one_run = after["conditioned"]["seconds"]  # the conditioned method: one training run for every w
        assert policies["conditioned-0.25"]["cost_s"] == pytest.approx(pairs + one_run)
        assert doc["methods"]["preference-conditioned"]["cost_s"] == pytest.approx(pairs + one_run)
        lo, hi = (policies[f"conditioned-{w}"]["objectives"]["sentiment"]["mean"] for w in (0.25, 0.75))
        assert lo != hi  # each w decoded at its own λ

        # run again: every step and every evaluation is reused, and the numbers are the same
        again = run_study(tiny=True, out=str(root))
        assert again["policies"] == json.loads(json.dumps(doc["policies"], default=float))
        assert json.loads((root / "eval" / "steps.json").read_text())["steps"] == evaluated
        assert policies["wrpo"]["cost_samples"] > policies["ls-0.5"]["cost_samples"] == 96 * 6

        # moray eval on two of the study's policies
        out = tmp_path / "eval"
        assert main(["eval", "--policies", f"dpo-sentiment={root / 'policies' / 'dpo-sentiment'},"
                     f"soup-0.5={root / 'policies' / 'soup-0.5'}", "--prompts", "demo:6", "--objectives",
                     "sentiment,conciseness", "--samples", "2", "--max-new-tokens", "16",
                     "--reference", "sentiment=-1,conciseness=-16", "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    ev = json.loads((out / "eval.json").read_text())
    got = np.array([[ev["policies"][n]["objectives"][k]["mean"] for k in ("sentiment", "conciseness")]
                    for n in ("dpo-sentiment", "soup-0.5")])
    assert ev["hypervolume"] == pytest.approx(hypervolume(got, (-1, -16)))
    assert all(0 < ev["policies"][n]["objectives"]["sentiment"]["ci95"] < 2 for n in ev["policies"])
    assert (out / "eval.png").exists() and "hypervolume" in capsys.readouterr().out
