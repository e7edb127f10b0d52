"""Pareto fronts, hypervolume and confidence intervals against hand-computed cases."""

import itertools

import numpy as np
import pytest

from reward_models.evaluate import (
    front_report,
    hypervolume,
    pareto_mask,
    plot,
    summarise,
)


def test_pareto_mask_dominated_duplicate_and_nan_points():
    pts = np.array([[1.0, 5.0],   # front
                    [3.0, 3.0],   # front
                    [2.0, 2.0],   # dominated by (3, 3)
                    [3.0, 3.0],   # duplicate of a front point: on the front too
                    [5.0, 1.0],   # front
                    [5.0, 0.5],   # dominated by (5, 1): equal on one objective, worse on the other
                    [np.nan, 9.0]])
    assert pareto_mask(pts).tolist() == [True, True, False, True, True, False, False]
    assert pareto_mask(np.array([[1.0, 1.0]])).tolist() == [True]
    with pytest.raises(ValueError):
        pareto_mask(np.array([1.0, 2.0]))


def test_hypervolume_two_objectives_by_hand():
    ref = (0.0, 0.0)
    assert hypervolume([[2.0, 3.0]], ref) == 6.0
    # staircase (1,5), (3,3), (5,1): 1*5 + 2*3 + 2*1 = 13
    stairs = [[1.0, 5.0], [3.0, 3.0], [5.0, 1.0]]
    assert hypervolume(stairs, ref) == pytest.approx(13.0)
    # dominated and duplicate points add nothing; order does not matter
    assert hypervolume(stairs + [[2.0, 2.0], [3.0, 3.0], [5.0, 0.5]], ref) == pytest.approx(13.0)
    assert hypervolume(stairs[::-1], ref) == pytest.approx(13.0)
    # a point below the reference on one objective adds nothing; the reference shifts the boxes
    assert hypervolume([[2.0, 3.0], [9.0, -1.0]], ref) == 6.0
    assert hypervolume(stairs, (1.0, 1.0)) == pytest.approx(0 * 4 + 2 * 2 + 2 * 0)
    assert hypervolume(np.zeros((0, 2)), ref) == 0.0
    # negative coordinates (conciseness is minus tokens) against a negative reference
    assert hypervolume([[0.5, -10.0], [0.0, -4.0]], (-1.0, -40.0)) == pytest.approx(1.5 * 30 + 1.0 * 6)


def test_hypervolume_three_objectives_matches_inclusion_exclusion():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0.1, 1.0, size=(5, 3))
    ref = np.zeros(3)
    # inclusion-exclusion over the union of boxes [0, p_i]
    want = 0.0
    for r in range(1, len(pts) + 1):
        for sub in itertools.combinations(range(len(pts)), r):
            want += (-1) ** (r + 1) * np.prod(pts[list(sub)].min(0))
    assert hypervolume(pts, ref) == pytest.approx(want, rel=1e-12)
    assert hypervolume([[1.0, 2.0, 3.0]], ref) == pytest.approx(6.0)


def test_summarise_means_over_prompts_with_a_t_interval():
    s = np.array([[1.0, 3.0],        # prompt mean 2
                  [4.0, np.nan],     # 4 (one sample unscorable)
                  [np.nan, np.nan],  # no scored sample: not counted
                  [6.0, 6.0]])       # 6
    got = summarise({"a": s})["a"]
    assert got["prompts"] == 3 and got["mean"] == pytest.approx(4.0)
    assert got["ci95"] == pytest.approx(4.303 * 2.0 / np.sqrt(3))  # sd of (2, 4, 6) is 2; t(2 dof) = 4.303


def test_front_report_and_plot(tmp_path):
    def r(a, b):
        return {"objectives": {"s": {"mean": a, "ci95": 0.1}, "c": {"mean": b, "ci95": 1.0}}}

    results = {"base": r(0.1, -20), "dpo-s": r(0.5, -25), "dpo-c": r(0.0, -5), "mix": r(0.3, -10), "bad": r(0.0, -30)}
    rep = front_report(results, ["s", "c"], (-1.0, -40.0))
    assert rep["front"] == ["dpo-s", "dpo-c", "mix"]
    assert rep["hypervolume"] == pytest.approx(hypervolume([[0.5, -25], [0.0, -5], [0.3, -10]], (-1, -40)))
    path = plot(results, ["s", "c"], str(tmp_path / "front.png"), groups={"dpo-s": "dpo", "dpo-c": "dpo"},
                transform={"c": lambda v: -v}, labels={"c": "tokens"})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def minilm_reward_model(tmp_path_factory):
    """A learned reward-model directory as ``moray train reward`` writes one (MiniLM backbone with
    a seeded scalar head; the training does not matter here)."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward_models.learned import resolve_backbone
    from trainers.core.metadata import METADATA_FILE

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_backbone("minilm"), num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_backbone("minilm")).save_pretrained(out)
    (out / METADATA_FILE).write_text(json.dumps({"kind": "reward_model"}))
    return str(out)


def test_eval_loads_a_learned_reward_model_once_for_every_policy(minilm_reward_model, tiny_model, monkeypatch):
    """Two policies evaluated: the reward model loads once (it was loaded again for each), and the
    scores are those of the reward model scoring each sample alone."""
    import reward_models.learned as learned
    from reward_models.evaluate import EvalSettings, evaluate
    from reward_models.objectives import get_scorer

    loads = []
    real = learned.load_reward_model
    monkeypatch.setattr(learned, "load_reward_model", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    prompts = ["How was the movie?", "Tell me about the park."]
    answers = {"a": [["I liked it.", "It was long."], ["Green and calm.", "Big."]],
               "b": [["Terrible.", "Fine, I guess."], ["Lovely trees.", "Crowded on Sundays."]]}
    policies = {name: (lambda p, n, s, r=r: r) for name, r in answers.items()}
    got = evaluate(policies, prompts, [minilm_reward_model], tiny_model, EvalSettings(samples=2))
    assert loads == [minilm_reward_model]
    alone = get_scorer(minilm_reward_model)
    for name, r in answers.items():
        want = np.mean([np.mean(alone.score([p] * 2, rs)) for p, rs in zip(prompts, r)])
        assert abs(got[name]["objectives"][minilm_reward_model]["mean"] - want) < 1e-6


def test_relevance_runs_in_the_placements_dtype():
    """``relevance`` loads MiniLM on the placement's device in its dtype (it ignored the placement):
    bf16 scores are the fp32 ones to bf16's precision."""
    import torch

    from reward_models.objectives import get_scorer
    from trainers.core.models import Placement

    prompts, responses = ["How was the movie?", "Tell me about the park."], ["I liked the film.", "Pasta is cheap."]
    fp32 = get_scorer("relevance", placement=Placement())
    bf16 = get_scorer("relevance", placement=Placement(dtype="bfloat16"))
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    want, got = fp32.score(prompts, responses), bf16.score(prompts, responses)
    assert want[0] > want[1] + 0.1  # the on-topic answer is the more relevant
    assert np.abs(got - want).max() < 2e-2


def test_per_prompt_means_skip_unscored_samples_and_mark_unscored_prompts():
    from reward_models.evaluate import per_prompt_means

    got = per_prompt_means({"sentiment": np.array([[1.0, np.nan], [np.nan, np.nan], [0.5, -0.5]])})
    assert got == {"sentiment": [1.0, None, 0.0]}
    assert summarise({"sentiment": np.array([[1.0, np.nan], [np.nan, np.nan], [0.5, -0.5]])})["sentiment"]["prompts"] == 2
