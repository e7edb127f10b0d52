"""`moray demo --tiny` end to end (slow): each DPO policy moves its own objective the right way;
the served mixes at unit weights move them too, and answer identically in both mixing modes."""

import json

import pytest

from tests.cluster.recipes.log_kinds import line_kinds

pytestmark = pytest.mark.slow


def test_tiny_demo_moves_each_objective(tiny_demo):
    table, root = tiny_demo["table"], tiny_demo["dir"]
    base, sent, conc = table["base"], table["dpo-sentiment"], table["dpo-conciseness"]
    assert sent["mean_sentiment"] > base["mean_sentiment"] + 0.1
    assert conc["mean_length_tokens"] < 0.8 * base["mean_length_tokens"]
    assert json.loads((root / "results.json").read_text()) == json.loads(json.dumps(table))
    assert all(r["sentiment_ci95"] > 0 and r["length_ci95"] > 0 for r in table.values())  # an interval beside every mean
    assert "a single draw per prompt from each served mix" in tiny_demo["stdout"]
    for objective in ("sentiment", "conciseness"):
        meta = json.loads((root / "policies" / f"dpo-{objective}" / "moray.json").read_text())
        assert meta["objective"] == objective and meta["workers"] == 2
    out = tiny_demo["stdout"]
    assert "dpo-sentiment" in out and "mean sentiment" in out and "MPO max-min weights" in out
    assert table["logits sentiment=1"]["mean_sentiment"] > base["mean_sentiment"] + 0.1
    assert table["logits conciseness=1"]["mean_length_tokens"] < 0.8 * base["mean_length_tokens"]
    for label in ("sentiment=1", "conciseness=1"):  # e_k is policy k itself in both modes: same seeded answers
        assert table[f"soup {label}"] == table[f"logits {label}"]
    gapo = json.loads((root / "policies" / "gapo" / "moray.json").read_text())
    assert gapo["method"] == "gapo" and gapo["objectives"] == ["sentiment", "conciseness"] and "gapo" in table
    mpo = json.loads((root / "mpo_weights.json").read_text())
    assert sum(mpo["weights"].values()) == pytest.approx(1.0) and table["logits mpo-maxmin"]["weights"] == mpo["weights"]
    mopo_meta = json.loads((root / "policies" / "mopo-0.5" / "moray.json").read_text())
    assert mopo_meta["method"] == "mopo" and mopo_meta["constraints"] == {"sentiment": 0.5}
    # the multipliers started at the dual's minimiser: the constraint holds at the end, and the table says so
    assert mopo_meta["constraints_met"] is True and mopo_meta["constraints_report"]["sentiment"]["estimate"] >= 0.49
    assert table["mopo"]["constraints"] == mopo_meta["constraints_report"]
    assert "MOPO constraints on the training candidates: sentiment 0." in out and "(threshold 0.5) met" in out
    # conciseness maximised, sentiment held: shorter than the base, more positive than DPO on conciseness alone
    mopo = table["mopo"]
    assert mopo["mean_length_tokens"] < 0.8 * base["mean_length_tokens"]
    assert mopo["mean_sentiment"] > conc["mean_sentiment"] + 0.05


def test_tiny_demo_log_reads_as_sentences(tiny_demo):
    """The demo's console log, written to a file: no progress blocks or bars (no terminal), no
    deprecation warnings from Moray's own calls into Ray, no stack dumps, no preemption-watcher
    errors from the embedded node; what is left is mostly Moray's sentences and the table."""
    text = tiny_demo["stdout"]
    kinds = line_kinds(text)
    lines = sum(kinds.values())
    assert kinds["progress_bar"] == kinds["ray_data_progress"] == kinds["stack_dump"] == 0, kinds
    assert "iter_torch_batches(collate_fn)" not in text and "exclude_resources" not in text
    assert "PreemptionWatcher" not in text
    assert kinds["moray"] >= 15 and lines <= 150, kinds
