"""`moray train reward`: a MiniLM reward model trained on on-policy pairs from the warm-started tiny
model, labelled by VADER sentiment (slow)."""

import json

import pytest

from cluster.cli import main
from cluster.recipes.base_models import build_tiny_model, warm_start
from reward_models.objectives import get_scorer
from reward_models.pairs import make_pairs
from reward_models.prompts import demo_prompts, tiny_corpus, tiny_dialogues
from trainers.core.runtime import init_ray


@pytest.mark.slow
def test_reward_model_learns_a_known_rule_from_tiny_model_pairs(tmp_path):
    import ray


    base = warm_start(build_tiny_model(str(tmp_path / "base"), tiny_corpus(600, seed=1)),
                      tiny_dialogues(600, seed=1), steps=300)
    init_ray(num_cpus=2)
    try:
        made = make_pairs(base, demo_prompts(120, seed=3), ["sentiment"], 4, str(tmp_path / "pairs"),
                          seed=3, max_new_tokens=32, actors=2)
        # the pair file's prompts are chat messages; a reward model takes plain strings
        rows = [json.loads(line) for line in open(made["pairs"]["sentiment"])]
        plain = tmp_path / "rm_pairs.jsonl"
        plain.write_text("".join(json.dumps({"prompt": r["prompt"][0]["content"], "chosen": r["chosen"],
                                             "rejected": r["rejected"]}) + "\n" for r in rows))
        assert len(rows) >= 80
        out = tmp_path / "rm"
        rc = main(["train", "reward", "--objective", "sentiment", "--data", str(plain), "--out", str(out),
                   "--workers", "2", "--lr", "5e-5", "--epochs", "2", "--micro-batch-size", "8",
                   "--eval-fraction", "0.25"])
        assert rc == 0
    finally:
        ray.shutdown()
    meta = json.loads((out / "moray.json").read_text())
    assert meta["kind"] == "reward_model" and meta["held_out_pairs"] == round(0.25 * len(rows))
    assert meta["held_out_accuracy"] >= 0.8, meta
    scorer = get_scorer(str(out))  # a trained directory is an objective
    s = scorer.score(["How was the movie?"] * 2, ["The movie was wonderful.", "The movie was horrible."])
    assert s[0] > s[1]
