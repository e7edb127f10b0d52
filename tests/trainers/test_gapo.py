"""GAPO on Ray Train + DeepSpeed (slow): two workers, ZeRO-2, per-objective labels on the same
pairs; plus the label plumbing from a multi-objective pair file."""

import json
import math

import pytest
import torch

from tests.conftest import synthetic_pairs, write_jsonl
from trainers.config import DataConfig
from trainers.data import load_pairs
from trainers.engine import BareEngine
from trainers.gapo import GAPOJobConfig


def _multi_rows(n, seed=5):
    rows = []
    for i, r in enumerate(synthetic_pairs(n, seed)):
        a, b = (r["chosen"], r["rejected"]) if i % 2 == 0 else (r["rejected"], r["chosen"])
        rows.append({"prompt": r["prompt"], "response_0": a, "response_1": b,
                     "better_sentiment": 0 if a == r["chosen"] else 1,
                     "better_conciseness": 0 if len(a.split()) <= len(b.split()) else 1})
    return rows


def test_signs_say_whether_each_objective_agrees_with_the_first(tmp_path):
    rows = _multi_rows(8)
    path = write_jsonl(tmp_path / "multi.jsonl", rows)
    cfg = DataConfig(path=path, response_columns=["response_0", "response_1"],
                     objective_labels={"sentiment": "better_sentiment", "conciseness": "better_conciseness"})
    table, _ = load_pairs(cfg, "sentiment", also=["conciseness"])
    for row, chosen, sign in zip(rows, table.column("chosen").to_pylist(), table.column("sign_conciseness").to_pylist()):
        assert chosen == row[f"response_{row['better_sentiment']}"]
        assert sign == (1.0 if row["better_sentiment"] == row["better_conciseness"] else -1.0)


@pytest.mark.slow
def test_gapo_two_workers_zero2(ray_local, tiny_model, tmp_path):
    from trainers.config import load_config
    from trainers.gapo import run_gapo
    from trainers.models import load_causal_lm

    data = write_jsonl(tmp_path / "multi.jsonl", _multi_rows(24))
    job = load_config(GAPOJobConfig, overrides={
        "objectives": ["sentiment", "conciseness"], "out": str(tmp_path / "gapo"), "model.name_or_path": tiny_model,
        "data.path": data, "train.workers": 2, "train.zero_stage": 2, "train.lr": 2e-3, "train.epochs": 2,
        "train.micro_batch_size": 4, "train.checkpoint_every": 0, "train.log_every": 1})
    metrics = run_gapo(job)
    meta = json.loads((tmp_path / "gapo" / "moray.json").read_text())
    assert meta["method"] == "gapo" and meta["objectives"] == ["sentiment", "conciseness"]
    trained, base = load_causal_lm(str(tmp_path / "gapo")), load_causal_lm(tiny_model)
    assert (trained.lm_head.weight - base.lm_head.weight).abs().max() > 1e-4
    assert abs(metrics["alpha/sentiment"] + metrics["alpha/conciseness"] - 1) < 1e-9
    assert metrics["grad_norm/sentiment"] > 0 and -1 <= metrics["grad_cosine"] <= 1
    assert 0 <= metrics["alpha/sentiment"] <= 1 and metrics["step"] == 6
    # the labels conflict (negative gradient cosine); the balanced step still lowers the losses' sum
    assert metrics["grad_cosine"] < 0
    assert metrics["loss/sentiment"] + metrics["loss/conciseness"] < 2 * math.log(2)


def _batch(tok, rows, ref_model=None):
    from trainers.data import tokenize_pair
    from trainers.logps import pad_pairs, pair_logps

    cols = {"chosen_ids": [], "rejected_ids": [], "chosen_start": [], "rejected_start": []}
    for r in rows:
        t = tokenize_pair(tok, r["prompt"], r["response_0"], r["response_1"], False, 64, 64)
        for k in cols:
            cols[k].append(t[k])
    batch = pad_pairs(cols, tok.pad_token_id)
    batch["sign_conciseness"] = torch.tensor([1.0 if r["better_conciseness"] == 0 else -1.0 for r in rows], dtype=torch.float64)
    with torch.no_grad():
        rc, rr = pair_logps(ref_model, batch)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = rc.double(), rr.double()
    return batch


def test_gapo_step_at_the_reference_head_gradients_and_pgapo(tiny_model):
    """At π = π_ref every objective's loss is log 2; the head gradients taken on the detached
    hidden states equal full autograd's head gradients; P-GAPO with preference e_1 gives
    c = (1/‖g_1‖, 0); the combined loss's gradient is Σ c_k ∇L_k."""
    from trainers.gapo import GAPOTask
    from trainers.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model)
    rows = [r for r in _multi_rows(6)]
    for r in rows:  # response_0 is the sentiment-preferred one in this orientation
        if r["better_sentiment"] == 1:
            r["response_0"], r["response_1"] = r["response_1"], r["response_0"]
            r["better_conciseness"] = 1 - r["better_conciseness"]
    batch = _batch(tok, rows, load_causal_lm(tiny_model).eval())
    cfg = GAPOJobConfig(objectives=["sentiment", "conciseness"])
    cfg.train.beta = 0.1
    task = GAPOTask(cfg)
    combined, _, _ = task.losses(BareEngine(model), batch)
    logged = task.step_metrics()
    for k in ("sentiment", "conciseness"):
        assert abs(logged[f"loss/{k}"] - math.log(2)) < 1e-6
    head = model.get_output_embeddings().weight
    full = []
    for k in range(2):
        per_pair = task._per_pair(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)[0]
        full.append(torch.autograd.grad(per_pair[k].mean(), head)[0].reshape(-1))
    norms = [float(g.norm()) for g in full]
    assert abs(logged["grad_norm/sentiment"] - norms[0]) < 1e-5 * norms[0]
    assert abs(logged["grad_norm/conciseness"] - norms[1]) < 1e-5 * norms[1]
    grad_combined = torch.autograd.grad(combined.mean(), head)[0].reshape(-1)
    c = torch.tensor([logged["alpha/sentiment"] / norms[0], logged["alpha/conciseness"] / norms[1]])  # p = 1
    torch.testing.assert_close(grad_combined, c[0] * full[0] + c[1] * full[1], rtol=1e-4, atol=1e-7)
    pcfg = GAPOJobConfig(objectives=["sentiment", "conciseness"], preference={"sentiment": 1.0})
    pcfg.train.beta = 0.1
    ptask = GAPOTask(pcfg)
    ptask.losses(BareEngine(model), batch)
    plog = ptask.step_metrics()
    assert plog["alpha/sentiment"] == 1.0 and plog["alpha/conciseness"] == 0.0
