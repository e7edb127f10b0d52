"""Objective registry, checked scoring, best-vs-worst pairs, batch scoring and `moray pairs`."""

import json
import math

import numpy as np
import pytest
import torch

from cluster.cli import main
from reward_models.batch import score_file
from reward_models.objectives import (
    check_objectives,
    get_scorer,
    score_all,
    score_checked,
)
from reward_models.pairs import best_vs_worst, labelled_pairs, score_candidates
from reward_models.prompts import demo_prompts, load_prompts
from reward_models.sampling import Generate
from trainers.core.models import load_tokenizer
from trainers.core.runtime import init_ray


def test_sentiment_orders_positive_above_negative():
    s = get_scorer("sentiment").score(["p"] * 3, ["What a wonderful, lovely day!", "It is a day.", "Awful, terrible day."])
    assert s[0] > 0.5 and s[2] < -0.5 and abs(s[1]) < 0.1


def test_conciseness_is_minus_token_count_and_bounded_variant(tiny_model):

    tok = load_tokenizer(tiny_model)
    resp = ["The movie was great.", "The movie was great. It felt fine."]
    s = get_scorer("conciseness", tok).score(["p", "p"], resp)
    counts = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in resp]
    assert list(s) == [-c for c in counts]
    assert list(get_scorer("conciseness").score(["p"], ["one two three"])) == [-3.0]
    b = get_scorer("conciseness_bounded", tok).score(["p", "p"], resp)
    np.testing.assert_allclose(b, [math.exp(-c / 64) for c in counts], rtol=0, atol=1e-15)


def test_harmlessness_counts_profane_words():
    s = get_scorer("harmlessness").score(["p"] * 3, ["have a nice day", "you stupid bastard", "shit"])
    assert list(s) == [0.0, pytest.approx(-2 / 3), -1.0]  # "stupid" and "bastard" are both listed


def test_relevance_prefers_an_on_topic_answer():
    s = get_scorer("relevance").score(["What is the capital of France?"] * 2,
                                      ["Paris is the capital of France.", "I like to eat bananas for breakfast."])
    assert s[0] > s[1] + 0.2 and -1 <= s[1] <= 1 and s[0] <= 1 + 1e-9


def lengths(prompts, responses):
    return [len(r.split()) for r in responses]


def bad_length(prompts, responses):
    return [1.0]


def with_nan(prompts, responses):
    return [float("nan")] * len(responses)


def test_user_scorer_and_every_bad_case():
    assert list(score_all([f"{__name__}:lengths"], ["a"], ["b c"])[f"{__name__}:lengths"]) == [2.0]
    with pytest.raises(ValueError, match="unknown objective 'humor'"):
        get_scorer("humor")
    with pytest.raises(ValueError, match="unknown objective 'humor'"):
        check_objectives(["sentiment", "humor"])
    with pytest.raises(ValueError, match="cannot load scorer 'no_such_module:f'"):
        check_objectives(["no_such_module:f"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_all(["sentiment"], ["a", "b"], ["x"])
    with pytest.raises(ValueError, match=r"sentiment: empty or non-string responses at rows \[1\]"):
        score_all(["sentiment"], ["a", "b"], ["fine", "  "])
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        score_checked("x", get_scorer(f"{__name__}:bad_length"), ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match=r"non-finite scores at rows \[0, 1\]"):
        score_checked("x", get_scorer(f"{__name__}:with_nan"), ["a", "b"], ["c", "d"])


def test_best_vs_worst_drops_ties_and_keeps_margin():
    prompts = ["p1", "p2", "p3", "p4"]
    responses = [["a", "b", "c"], ["x", "y"], ["same", "same"], ["", "only"]]
    scores = [np.array([0.1, 0.9, -0.5]), np.array([0.3, 0.3]), np.array([1.0, 0.0]), np.array([np.nan, 1.0])]
    pairs = best_vs_worst(prompts, responses, scores)
    assert pairs == [{"prompt": "p1", "chosen": "b", "rejected": "c", "margin": pytest.approx(1.4)}]


def test_empty_samples_score_nan_not_fail():
    s = score_candidates(["sentiment"], ["p", "q"], [["great!", ""], ["bad", "ok"]])
    assert np.isnan(s["sentiment"][0, 1]) and np.isfinite(s["sentiment"][1]).all()


@pytest.mark.slow
def test_batch_scoring_equals_one_by_one_and_pairs_command(tmp_path, tiny_model):
    import ray


    rows = [{"prompt": f"Tell me about the park {i}.", "response": r}
            for i, r in enumerate(["Lovely and green.", "Awful, noisy and dirty.", "It is a park.",
                                   "What a wonderful happy place to be!", "Bad.", "Fine I guess."] * 5)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    init_ray(num_cpus=2)
    try:
        n = score_file(["sentiment", "conciseness"], str(data), str(tmp_path / "scored.jsonl"), batch_size=7)
        assert n == len(rows)
        assert main(["score", "--objectives", "sentiment,conciseness", "--data", str(data),
                     "--out", str(tmp_path / "scored.parquet")]) == 0
        import pyarrow.parquet as pq

        assert pq.read_table(tmp_path / "scored.parquet").column("score_sentiment").to_pylist() == \
            [json.loads(x)["score_sentiment"] for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
        scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
        one = {k: [float(get_scorer(k).score([r["prompt"]], [r["response"]])[0]) for r in rows]
               for k in ("sentiment", "conciseness")}
        assert [r["response"] for r in scored] == [r["response"] for r in rows]
        assert [r["score_sentiment"] for r in scored] == one["sentiment"]
        assert [r["score_conciseness"] for r in scored] == one["conciseness"]

        args = ["pairs", "--model", tiny_model, "--prompts", "demo:6", "--objectives", "sentiment,conciseness",
                "--samples-per-prompt", "3", "--max-new-tokens", "12", "--seed", "5"]
        assert main(args + ["--out", str(tmp_path / "a")]) == 0
        assert main(args + ["--out", str(tmp_path / "b")]) == 0
    finally:
        ray.shutdown()
    for f in ("pairs_sentiment.jsonl", "pairs_conciseness.jsonl", "candidates.jsonl"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()  # seeded
    cands = [json.loads(line) for line in (tmp_path / "a" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 6 and all(len(c["responses"]) == 3 for c in cands)
    for line in (tmp_path / "a" / "pairs_sentiment.jsonl").read_text().splitlines():
        pair = json.loads(line)
        assert pair["chosen"] != pair["rejected"] and pair["margin"] > 0


def test_load_prompts_from_every_source(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq


    want = ["How was the trip?", "Describe the cafe."]
    (tmp_path / "p.txt").write_text("\n".join(want) + "\n\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"q": p}) + "\n" for p in want))
    pq.write_table(pa.table({"q": want}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"q": want}).save_to_disk(str(tmp_path / "hf"))
    assert load_prompts(str(tmp_path / "p.txt")) == want
    for src in ("p.jsonl", "p.parquet", "hf"):
        assert load_prompts(str(tmp_path / src), column="q") == want
    assert load_prompts("demo:5") == demo_prompts(5)
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(str(tmp_path / "hf"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(ValueError, match=r"rows \[1\] have no non-empty 'prompt'"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_labelled_pairs_carry_every_objectives_preference():

    responses = [["a", "bb", "ccc"], ["x", "y"], ["p", "q"]]
    scores = {"sentiment": [np.array([0.9, 0.1, 0.5]), np.array([0.2, 0.2]), np.array([0.3, 0.1])],
              "conciseness": [np.array([-1.0, -2.0, -3.0]), np.array([-1.0, -2.0]), np.array([-1.0, np.nan])]}
    rows = labelled_pairs(["P0", "P1", "P2"], responses, scores, ["sentiment", "conciseness"])
    # prompt 0: sentiment picks (a, bb), conciseness picks (a, ccc); prompt 1 ties on sentiment;
    # prompt 2 cannot be scored for conciseness
    assert [(r["response_0"], r["response_1"]) for r in rows] == [("a", "bb"), ("a", "ccc")]
    assert rows[0]["better_sentiment"] == 0 and rows[0]["better_conciseness"] == 0
    assert rows[1]["better_sentiment"] == 0 and rows[1]["better_conciseness"] == 0
    assert rows[0]["prompt"] == [{"role": "user", "content": "P0"}]


def test_generate_passes_top_k_to_hf_generate(tiny_model):
    """Sampling at temperature 1 with ``top_k=1`` is greedy decoding (the knob reaches ``generate``);
    the default stays HF's 50, which the Serve decoder and ``moray study``'s mixes are given."""

    batch = {"prompt": np.array(["Tell me about the park.", "Hi"], dtype=object), "row": np.arange(2)}
    greedy = Generate(tiny_model, 1, 12, 0.0, 1.0, seed=3)(batch)["responses"].tolist()
    assert Generate(tiny_model, 1, 12, 1.0, 1.0, seed=3, top_k=1)(batch)["responses"].tolist() == greedy
    assert Generate(tiny_model, 1, 12, 1.0, 1.0, seed=3).top_k == 50


def test_generate_on_a_bf16_placement_returns_host_ids(tiny_model):
    """An actor placed in bf16 samples (on the CPU here), and its ids come back as plain lists."""
    from trainers.core.models import Placement

    batch = {"prompt": np.array(["Tell me about the park.", "Hi"], dtype=object), "row": np.arange(2)}
    gen = Generate(tiny_model, 2, 8, 1.0, 1.0, seed=3, keep_ids=True, placement=Placement(dtype="bfloat16"))
    assert gen.model.dtype == torch.bfloat16
    out = gen(batch)
    assert [len(json.loads(r)) for r in out["responses"]] == [2, 2]
    assert all(isinstance(t, int) for ids in json.loads(out["response_ids"][0]) for t in ids)
