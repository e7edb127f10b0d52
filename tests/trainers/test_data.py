"""Preference data: reading, column mapping, validation with file and row numbers, tokenization masks."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import synthetic_pairs, write_jsonl
from trainers.batches import length_buckets, pad_pairs, pair_logps
from trainers.core.logps import logits_needed
from trainers.core.logps import sequence_logps
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.data import PreferenceDataError, Tokenize, load_pairs, tokenize_pair
from trainers.job_config import DataConfig


def test_jsonl_and_parquet_give_the_same_pairs(tmp_path):
    rows = synthetic_pairs(10)
    j = write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    t1, r1 = load_pairs(DataConfig(path=j), "sentiment")
    t2, r2 = load_pairs(DataConfig(path=str(tmp_path / "p.parquet")), "sentiment")
    assert r1.kept == r2.kept == 10 and r1.skipped == 0
    assert t1.column("chosen").to_pylist() == t2.column("chosen").to_pylist() == [r["chosen"] for r in rows]
    assert t1.column("idx").to_pylist() == list(range(10))


def test_rows_beyond_the_memory_limit_are_staged_and_split_exactly(tmp_path, monkeypatch):
    """Past data.in_memory_mb the validated rows go to parquet at the stage URI as they come, and the
    per-worker files hold exactly the rows the in-memory table's slices would."""
    import trainers.data as data
    from trainers.launch import split_staged

    monkeypatch.setattr(data, "CHUNK_ROWS", 7)  # several record batches, split across rank borders
    rows = synthetic_pairs(50, seed=2)
    rows[3]["chosen"] = ""
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    table, report = load_pairs(DataConfig(path=path, skip_invalid=True), "s")
    staged, staged_report = load_pairs(DataConfig(path=path, skip_invalid=True, in_memory_mb=0), "s",
                                       stage=f"file://{tmp_path}/stage")
    assert isinstance(table, pa.Table) and isinstance(staged, data.StagedRows)
    assert staged.num_rows == table.num_rows == report.kept == staged_report.kept == 49 and report.skipped == 1
    assert pq.read_table(tmp_path / "stage" / "rows.parquet").equals(table)
    parts = split_staged(staged, 3, 16)  # 49 rows, 3 workers: 16 each, the last row dropped
    assert parts == [f"file://{tmp_path}/stage/rank{r}.parquet" for r in range(3)]
    for r in range(3):
        assert pq.read_table(tmp_path / "stage" / f"rank{r}.parquet").equals(table.slice(16 * r, 16))
    # without a stage the rows stay in memory whatever their size
    assert isinstance(load_pairs(DataConfig(path=path, skip_invalid=True, in_memory_mb=0), "s")[0], pa.Table)


def test_hf_save_to_disk_directory(tmp_path):
    import datasets

    rows = synthetic_pairs(6)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    table, report = load_pairs(DataConfig(path=str(tmp_path / "hf")), "x")
    assert report.kept == 6 and table.column("rejected").to_pylist()[3] == rows[3]["rejected"]


def test_invalid_rows_are_named_by_file_and_row(tmp_path):
    rows = synthetic_pairs(8)
    rows[2]["chosen"] = ""                      # empty
    del rows[4]["rejected"]                     # missing
    rows[5]["prompt"] = 17                      # not a string
    rows[6]["rejected"] = rows[6]["chosen"]     # identical
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PreferenceDataError) as e:
        load_pairs(DataConfig(path=path), "s")
    msg = str(e.value)
    assert "4 invalid" in msg and "bad.jsonl" in msg
    assert "chosen empty (row 2)" in msg
    assert "rejected missing (row 4)" in msg
    assert "prompt not a string (int) (row 5)" in msg
    assert "chosen == rejected (row 6)" in msg


def test_skip_invalid_drops_and_counts(tmp_path):
    rows = synthetic_pairs(8)
    rows[1]["chosen"] = None
    rows[7]["chosen"] = rows[7]["rejected"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    table, report = load_pairs(DataConfig(path=path, skip_invalid=True), "s")
    assert (report.total, report.kept, report.skipped) == (8, 6, 2)
    assert table.column("prompt").to_pylist() == [r["prompt"] for i, r in enumerate(rows) if i not in (1, 7)]


def test_malformed_json_line_is_named(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(synthetic_pairs(1)[0]) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_pairs(DataConfig(path=str(p)), "s")


def test_column_mapping_and_multi_objective_labels(tmp_path):
    rows = [{"q": "How do I stay safe?", "response_0": "Lock the door.", "response_1": "Ignore it.",
             "better_response_id": 1, "safer_response_id": 0},
            {"q": "Tell me a joke.", "response_0": "No.", "response_1": "Why did the chicken...",
             "better_response_id": 1, "safer_response_id": 1}]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    cfg = DataConfig(path=path, columns={"prompt": "q"}, response_columns=["response_0", "response_1"],
                     objective_labels={"helpful": "better_response_id", "harmless": "safer_response_id"})
    helpful, _ = load_pairs(cfg, "helpful")
    harmless, _ = load_pairs(cfg, "harmless")
    assert helpful.column("chosen").to_pylist() == ["Ignore it.", "Why did the chicken..."]
    assert harmless.column("chosen").to_pylist() == ["Lock the door.", "Why did the chicken..."]
    assert harmless.column("rejected").to_pylist()[0] == "Ignore it."
    assert helpful.column("prompt").to_pylist()[0] == "How do I stay safe?"
    with pytest.raises(PreferenceDataError, match="objective 'honest'"):
        load_pairs(cfg, "honest")
    rows[0]["safer_response_id"] = 2
    bad = write_jsonl(tmp_path / "pku_bad.jsonl", rows)
    with pytest.raises(PreferenceDataError, match=r"safer_response_id must be 0 or 1 \(row 0\)"):
        load_pairs(DataConfig(**{**cfg.__dict__, "path": bad}), "harmless")


def test_tokenization_truncates_and_masks(tiny_model):
    tok = load_tokenizer(tiny_model)
    prompt = "Write about the coffee. " * 30
    t = tokenize_pair(tok, prompt, "The coffee is great and lovely.", "The coffee is awful.", False,
                      max_prompt_length=10, max_response_length=5)
    full_prompt = tok(prompt)["input_ids"]
    assert t["chosen_start"] == t["rejected_start"] == 10
    # prompt kept from the left end: its last 10 tokens
    assert list(t["chosen_ids"][:10]) == full_prompt[-10:]
    # chosen truncated from the right to 5 tokens
    assert list(t["chosen_ids"][10:]) == tok("The coffee is great and lovely.", add_special_tokens=False)["input_ids"][:5]
    # short response keeps its EOS
    short = tok("The coffee is awful.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(t["rejected_ids"][10:]) == short[:5]


def test_chat_messages_use_the_template(tiny_model):
    tok = load_tokenizer(tiny_model)
    prompt = json.dumps([{"role": "user", "content": "Hi there"}])
    chosen = json.dumps([{"role": "assistant", "content": "Hello, lovely day."}])
    rejected = json.dumps([{"role": "assistant", "content": "Go away."}])
    t = tokenize_pair(tok, prompt, chosen, rejected, True, 64, 64)
    text = tok.decode(t["chosen_ids"])
    assert text.startswith("<|user|>Hi there<|end|><|assistant|>")
    assert tok.decode(t["chosen_ids"][t["chosen_start"]:]) == "Hello, lovely day.<|end|>"


def test_only_response_tokens_count_in_logps():
    # two pairs of different lengths; vocab 5; a uniform model gives log(1/5) per counted token
    rows = {"chosen_ids": [np.array([1, 2, 3, 4]), np.array([1, 2])],
            "rejected_ids": [np.array([1, 2, 3]), np.array([1, 2, 3, 4, 4, 4])],
            "chosen_start": np.array([2, 1]), "rejected_start": np.array([1, 3])}
    batch = pad_pairs(rows, pad_id=0)
    assert batch["input_ids"].shape == (4, 6)
    expected_counts = torch.tensor([2, 1, 2, 3])  # len - start per row; padding never counts
    assert torch.equal(batch["response_mask"].sum(1), expected_counts)
    logits = torch.zeros(4, 6, 5, dtype=torch.float64)
    logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    torch.testing.assert_close(logps, expected_counts.double() * np.log(1 / 5), rtol=0, atol=1e-12)
    # a huge logit on a padding position must not move anything
    logits[1, 3:, :] = 1e4
    torch.testing.assert_close(sequence_logps(logits, batch["input_ids"], batch["response_mask"]), logps)


def test_length_buckets_are_seeded_and_cover_every_row():
    rows = {"chosen_ids": [np.zeros(n) for n in [5, 1, 9, 3, 7, 2, 8]],
            "rejected_ids": [np.zeros(2)] * 7}
    a = length_buckets(rows, 2, seed=(0, 1, 5))
    b = length_buckets(rows, 2, seed=(0, 1, 5))
    assert [list(x) for x in a] == [list(x) for x in b]
    assert sorted(int(i) for chunk in a for i in chunk) == list(range(7))
    for chunk in length_buckets(rows, 2, seed=(0,), shuffle=False):
        lens = [len(rows["chosen_ids"][i]) for i in chunk]
        assert lens == sorted(lens)


def test_tokenize_map_batches_callable(tiny_model, pairs_file):
    table, _ = load_pairs(DataConfig(path=pairs_file), "s")
    batch = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    out = Tokenize(tiny_model, 32, 32)(batch)
    assert len(out["chosen_ids"]) == table.num_rows
    assert all(out["chosen_start"] > 0)
    assert list(out["idx"]) == list(range(table.num_rows))


def test_logits_to_keep_gives_the_same_logps(tiny_model):

    tok = load_tokenizer(tiny_model)
    rows = {k: [] for k in ("chosen_ids", "rejected_ids", "chosen_start", "rejected_start")}
    for p, c, r in [("Write about the coffee shop near the station, please.", "Great.", "Awful and sad."),
                    ("Short?", "The movie was lovely and fun.", "Bad.")]:
        t = tokenize_pair(tok, p, c, r, False, 64, 64)
        for k in rows:
            rows[k].append(t[k])
    batch = pad_pairs(rows, tok.pad_token_id)
    model = load_causal_lm(tiny_model, dtype=torch.float64).eval()
    keep = logits_needed(batch["response_mask"])
    assert keep == batch["input_ids"].shape[1] - min(rows["chosen_start"] + rows["rejected_start"]) + 1
    assert keep < batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = sequence_logps(full, batch["input_ids"], batch["response_mask"])
        c, r = pair_logps(model, batch)
    torch.testing.assert_close(torch.cat([c, r]), expected, rtol=0, atol=1e-10)
