"""Datasets rated per attribute (UltraFeedback's per-aspect ratings, HelpSteer2's per-attribute
columns), written here in their published shapes, become per-objective pairs through
`moray pairs --from-ratings`."""

import json

import pytest

from cluster.cli import main
from tests.helpers import write_jsonl
from trainers.data import PreferenceDataError
from trainers.ratings import RatingsMapping, pairs_from_ratings


def completion(text, helpfulness, honesty, instruction_following="4", truthfulness="5"):
    """One entry of openbmb/UltraFeedback's ``completions`` (ratings are strings, "N/A" for none)."""
    return {"model": "gpt-4", "principle": "helpfulness", "custom_system_prompt": "", "response": text,
            "overall_score": 7.0, "critique": "Fine.", "fine-grained_score": 4.0,
            "annotations": {"helpfulness": {"Rating": helpfulness, "Rationale": "...", "Type": ["1", "2"]},
                            "honesty": {"Rating": honesty, "Rationale": "..."},
                            "instruction_following": {"Rating": instruction_following, "Rationale": "..."},
                            "truthfulness": {"Rating": truthfulness, "Rationale": "...", "Type": ["0"]}}}


def ultrafeedback_rows():
    return [{"source": "evol_instruct", "instruction": "Name three primes.", "models": ["a", "b", "c", "d"],
             "correct_answers": [], "incorrect_answers": [],
             "completions": [completion("2, 3 and 5.", "5", "5"), completion("4, 6, 8.", "1", "4"),
                             completion("Primes are numbers.", "2", "N/A"), completion("2, 3, 7.", "4", "2")]},
            {"source": "sharegpt", "instruction": "Say hi.", "models": ["a", "b"],
             "correct_answers": [], "incorrect_answers": [],
             "completions": [completion("Hi!", "3", "5"), completion("Hello.", "3", "4")]}]


def helpsteer2_rows():
    """nvidia/HelpSteer2: one row per response, two responses per prompt, attributes 0-4."""
    return [{"prompt": "What is DNA?", "response": "A molecule carrying genetic code.", "helpfulness": 4,
             "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 1},
            {"prompt": "What is DNA?", "response": "Something in cells, I think, maybe.", "helpfulness": 1,
             "correctness": 2, "coherence": 3, "complexity": 1, "verbosity": 2},
            {"prompt": "Write a limerick.", "response": "There once was a cat from Peru...", "helpfulness": 3,
             "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 2},
            {"prompt": "Write a limerick.", "response": "No.", "helpfulness": 0, "correctness": 3,
             "coherence": 4, "complexity": 0, "verbosity": 0}]


def read(path):
    return [json.loads(line) for line in open(path)]


def test_ultrafeedback_aspects_become_pairs_per_named_objective(tmp_path, capsys):
    data = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows())
    main(["pairs", "--from-ratings", data, "--prompt-column", "instruction", "--responses", "completions",
          "--ratings", "helpful=annotations.helpfulness.Rating,honest=annotations.honesty.Rating",
          "--out", str(tmp_path / "out")])
    made = json.loads(capsys.readouterr().out)
    helpful, honest = read(made["pairs"]["helpful"]), read(made["pairs"]["honest"])
    # prompt 2 ties on helpfulness (3 vs 3): dropped; "N/A" is no rating
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in helpful] == [("2, 3 and 5.", "4, 6, 8.", 4.0)]
    assert [(p["chosen"], p["rejected"]) for p in honest] == [("2, 3 and 5.", "2, 3, 7."), ("Hi!", "Hello.")]
    assert helpful[0]["prompt"] == [{"role": "user", "content": "Name three primes."}]
    multi = read(made["pairs_multi"])  # honesty's pair of prompt 1 both objectives order alike; prompt 2 ties
    assert [(r["response_0"], r["response_1"], r["better_helpful"], r["better_honest"]) for r in multi] == [
        ("2, 3 and 5.", "4, 6, 8.", 0, 0), ("2, 3 and 5.", "2, 3, 7.", 0, 0)]
    cands = read(made["candidates"])
    assert cands[0]["scores"]["honest"] == [5.0, 4.0, None, 2.0] and made["counts"]["multi"] == 2


def test_helpsteer2_rows_grouped_by_prompt_and_min_margin(tmp_path):
    data = write_jsonl(tmp_path / "hs2.jsonl", helpsteer2_rows())
    m = RatingsMapping({"helpfulness": "helpfulness", "correctness": "correctness"})
    made = pairs_from_ratings(data, m, str(tmp_path / "out"))
    assert made["prompts"] == 2 and made["counts"] == {"helpfulness": 2, "correctness": 1, "multi": 1}
    assert read(made["pairs"]["correctness"])[0]["rejected"] == "Something in cells, I think, maybe."
    narrow = pairs_from_ratings(data, m, str(tmp_path / "out2"), min_margin=2.5)
    # helpfulness' margins are 3 and 3, correctness' 2; the labelled pair needs only its picker's margin
    assert narrow["counts"] == {"helpfulness": 2, "correctness": 0, "multi": 1}


def test_bad_rated_rows_are_named_and_a_wrong_path_is_refused(tmp_path):
    rows = ultrafeedback_rows()
    rows[1]["completions"][1]["response"] = ""
    data = write_jsonl(tmp_path / "uf.jsonl", rows)
    m = RatingsMapping({"helpful": "annotations.helpfulness.Rating"}, "instruction", "completions")
    with pytest.raises(PreferenceDataError, match=r"uf.jsonl: response missing or empty \(row 1\)"):
        pairs_from_ratings(data, m, str(tmp_path / "o"))
    assert pairs_from_ratings(data, m, str(tmp_path / "o"), skip_invalid=True)["skipped_invalid"] == 1
    typo = RatingsMapping({"helpful": "annotations.helpful.Rating"}, "instruction", "completions")
    with pytest.raises(PreferenceDataError, match="no response has a number at 'annotations.helpful.Rating'"):
        pairs_from_ratings(data, typo, str(tmp_path / "o"), skip_invalid=True)
