"""Micro-batches: packed sequences (no padding, each attending only to itself) give the same
sequence log-probs as right-padded rows, to 1e-6 in float64, for pairs and for rows of more
responses; packing leaves less padding; the riders follow their rows."""

import numpy as np
import pytest
import torch

from tests.helpers import (HEAD_BOUND, bf16_head_errors, candidates, packing_gap, response_columns,
                           synthetic_pairs)
from trainers.batches import ATTENTION_ONE_ROW, pack_pairs, packs_one_row, pad_pairs, pair_logps
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.job_config import ModelConfig
from trainers.jobs.dpo import DPOJobConfig, DPOTask


_rows = response_columns


@pytest.mark.parametrize("responses", [2, 4])
def test_packed_log_probs_equal_padded_ones_in_float64(tiny_model, responses):
    tok = load_tokenizer(tiny_model)
    if responses == 2:
        rows, names = synthetic_pairs(6, seed=2), ["chosen", "rejected"]
    else:
        rows = [{"prompt": r["prompt"], **{f"cand_{i}": t for i, t in enumerate(r["responses"])}} for r in candidates(5)]
        names = [f"cand_{i}" for i in range(4)]
    cols = _rows(tok, rows, names)
    model = load_causal_lm(tiny_model).double().eval()
    index = [4, 0, 3, 1, 2]
    padded, packed = pad_pairs(cols, tok.pad_token_id, index), pack_pairs(cols, tok.pad_token_id, index)
    with torch.no_grad():
        want = torch.stack(pair_logps(model, padded, responses))
        got = torch.stack(pair_logps(model, packed, responses))
    assert got.dtype == torch.float64 and got.shape == (responses, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())  # the same real tokens
    assert packed["idx"].tolist() == index and packed["sign_x"].tolist() == [1.0, 1.0, -1.0, -1.0, 1.0]
    assert packed["responses"] == padded["responses"] == tuple(names)


def test_packing_fills_rows_first_fit_decreasing_and_restarts_positions():
    cols = {"chosen_ids": [np.arange(1, 9), np.arange(1, 4)], "chosen_start": [6, 1],
            "rejected_ids": [np.arange(1, 6), np.arange(1, 3)], "rejected_start": [4, 1]}
    b = pack_pairs(cols, 0)
    # lengths 8, 3, 5, 2 into rows of 8: [8], [5, 3], [2 + 6 free]
    assert b["input_ids"].shape == (3, 8)
    assert b["position_ids"].tolist() == [list(range(8)), [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert b["attention_mask"].sum().item() == 18 and b["sequences"] == 4
    # sequence 0 (chosen of row 0) predicts its tokens 6, 7 from positions 5, 6 of packed row 0
    owner0 = b["pred_index"][b["pred_owner"] == 0].tolist()
    assert owner0 == [5, 6] and b["pred_labels"][b["pred_owner"] == 0].tolist() == [7, 8]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("one_row", [False, True])
def test_packed_log_probs_equal_padded_ones_for_each_attention_that_runs_here(tiny_model, attn, one_row):
    """Every accepted kernel that runs on a CPU, in both packed layouts (rows, and the one row flash
    attention gets): packed log-probs are the padded ones in float64."""
    tok = load_tokenizer(tiny_model)
    cols = _rows(tok, synthetic_pairs(6, seed=3), ["chosen", "rejected"])
    model = load_causal_lm(tiny_model, attn_implementation=attn).double().eval()
    assert (pack_pairs(cols, tok.pad_token_id, [5, 1], one_row)["input_ids"].shape[0] == 1) == one_row
    assert packing_gap(model, cols, tok.pad_token_id, [5, 1, 3, 0], one_row) <= 1e-6


def test_flash_attention_gets_one_row_that_transformers_reads_as_separate_sequences():
    """transformers' own flash-attention helpers: the one-row layout is detected as packed and cut at
    each sequence's start; the several-row layout (what flash attention got before) is not detected
    at all, so its sequences would attend to each other."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    cols = {"chosen_ids": [np.arange(1, 9), np.arange(1, 4)], "chosen_start": [6, 1],
            "rejected_ids": [np.arange(1, 6), np.arange(1, 3)], "rejected_start": [4, 1]}
    assert [k for k, one in ATTENTION_ONE_ROW.items() if one] == ["flash_attention_2", "flash_attention_3"]
    cfg = DPOJobConfig(model=ModelConfig(attn_implementation="flash_attention_2"))
    flash = DPOTask(cfg).collate(cols, 0, [0, 1])  # what the loop hands the model
    pos = flash["position_ids"]
    assert pos.shape == (1, 18) and _is_packed_sequence(pos, pos.shape[0])
    (cu_q, cu_k), _ = prepare_fa_kwargs_from_position_ids(pos)
    # first-fit decreasing order: lengths 8, 5, 3, 2 back to back
    assert cu_q.tolist() == cu_k.tolist() == [0, 8, 13, 16, 18]
    rows = pack_pairs(cols, 0, one_row=packs_one_row("sdpa"))
    assert rows["position_ids"].shape[0] == 3 and not _is_packed_sequence(rows["position_ids"], 3)
    with pytest.raises(ValueError, match="flex_attention"):
        packs_one_row("flex_attention")


def test_bf16_model_log_probs_come_from_a_float32_head(tiny_model):
    """A bf16 model with logits around 20 (its head scaled), as trained LMs have: the head runs in
    float32, so the sequence log-probs are float64's on the same hidden states within HEAD_BOUND;
    the bf16 head (the path before) rounds logits to steps of 0.125 there and misses by far more."""
    new, old = bf16_head_errors(tiny_model)
    assert new <= HEAD_BOUND < old, (new, old)
