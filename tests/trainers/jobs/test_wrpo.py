"""WRPO (§7) on the spine: the α = 0 step is a DPO step on (y_wt, y_l), α = 1 one on (y_ws, y_l);
`moray pairs --wrpo` rows; a 2-worker ZeRO-2 job from those rows (slow)."""

import json

import numpy as np
import pytest
import torch

from cluster.cli import main
from reward_models.pairs import scalarise, wrpo_rows
from tests.helpers import BareEngine, make_policy, preference_batch, synthetic_pairs
from trainers.core.config import load_config
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.jobs.dpo import DPOJobConfig, DPOTask
from trainers.jobs.wrpo import WRPOJobConfig, WRPOTask
from trainers.jobs.wrpo import run as run_wrpo


def _step(task, model, batch, lr=1e-2):
    """One SGD step of the task's mean loss; returns the loss and the updated weights."""
    losses, _ = task.losses(BareEngine(model), batch)
    model.zero_grad()
    losses.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return float(losses.detach().mean()), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("alpha_max,dpo_chosen", [(0.0, "chosen"), (1.0, "source")])
def test_wrpo_step_at_alpha_0_and_1_is_a_dpo_step(tiny_model, alpha_max, dpo_chosen):

    tok = load_tokenizer(tiny_model)
    ref = load_causal_lm(tiny_model).eval()
    rows = synthetic_pairs(6, seed=3)
    for i, r in enumerate(rows):  # a different positive text from the "source models"
        r["source"] = f"Truly {'wonderful' if i % 2 else 'lovely'} work on this one, friend."
    wrpo_cfg = WRPOJobConfig(objective="sentiment", alpha_max=alpha_max)
    task = WRPOTask(wrpo_cfg)
    task.start_step(10, 10)  # the end of the ramp: α = alpha_max
    assert task.alpha == alpha_max
    torch.manual_seed(0)
    loss_w, after_w = _step(task, load_causal_lm(tiny_model),
                            preference_batch(tok, rows, ref, ("chosen", "rejected", "source")))
    dpo_rows = [{**r, "chosen": r[dpo_chosen]} for r in rows]
    loss_d, after_d = _step(DPOTask(DPOJobConfig(objective="sentiment")), load_causal_lm(tiny_model),
                            preference_batch(tok, dpo_rows, ref))
    assert abs(loss_w - loss_d) < 1e-6 and abs(loss_w - np.log(2)) < 1e-5  # π = π_ref before the step
    for k in after_d:
        torch.testing.assert_close(after_w[k], after_d[k], rtol=1e-5, atol=1e-7)


def test_wrpo_alpha_ramps_over_the_optimizer_steps():
    task = WRPOTask(WRPOJobConfig(objective="x", alpha_max=0.2))
    seen = []
    for step in range(5):
        task.start_step(step, 4)
        seen.append(round(task.end_step()["alpha"], 12))
    assert seen == [0.0, 0.05, 0.1, 0.15, 0.2]
    with pytest.raises(ValueError, match="alpha_max"):
        WRPOJobConfig(objective="x", out="o", alpha_max=1.5, model=DPOJobConfig().model,
                      data=DPOJobConfig().data).validate()


def test_wrpo_rows_pick_best_source_and_target_best_worst():
    prompts = ["a", "b", "c", "d"]
    target = [["t0", "t1", "t2"], ["u0", "u1", "u2"], ["v0", "v1", "v2"], ["w0", "w1", "w2"]]
    source = [["s0", "s1"], ["r0", "r1"], ["q0", "q1"], ["p0", "p1"]]
    ts = np.array([[1.0, 3.0, 2.0], [1.0, 1.0, 1.0], [0.0, 2.0, np.nan], [5.0, 1.0, 3.0]])
    ss = np.array([[0.5, 4.0], [9.0, 9.0], [0.0, -1.0], [np.nan, np.nan]])
    rows = wrpo_rows(prompts, target, source, ts, ss)
    # b: the target ties; c: the source's best does not beat the target's worst; d: no source score
    assert [r["prompt"][0]["content"] for r in rows] == ["a"]
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["source"]) == ("t1", "t0", "s1")
    assert rows[0]["scores"] == {"source": 4.0, "chosen": 3.0, "rejected": 1.0}


def test_scalarise_standardises_each_objective():
    a = np.array([[1.0, 2.0, 3.0]])
    b = np.array([[300.0, 100.0, np.nan]])
    one = scalarise({"a": a})
    assert np.array_equal(one, a)
    both = scalarise({"a": a, "b": b}, {"a": 0.5, "b": 0.5})
    za = (a - a.mean()) / a.std()
    zb = (b - np.nanmean(b)) / np.nanstd(b)
    np.testing.assert_allclose(both, 0.5 * za + 0.5 * zb, rtol=0, atol=1e-12)
    assert np.isnan(both[0, 2])


@pytest.mark.slow
def test_wrpo_pairs_and_two_worker_zero2_job(ray_local, tiny_model, tmp_path):
    """`moray pairs --wrpo` from the tiny model (target) and a nudged copy (source), then
    `moray train wrpo` on 2 workers with ZeRO-2; α reaches α_max on the last step."""

    source = make_policy(tiny_model, tmp_path / "source", seed=1, noise=0.2)
    assert main(["pairs", "--wrpo", "--target", tiny_model, "--sources", source, "--prompts", "demo:16",
                 "--objectives", "conciseness", "--samples-per-prompt", "4", "--max-new-tokens", "16",
                 "--seed", "2", "--out", str(tmp_path / "pairs")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "pairs" / "wrpo.jsonl").read_text().splitlines()]
    assert len(rows) >= 4
    for r in rows:
        assert r["scores"]["chosen"] > r["scores"]["rejected"] and r["scores"]["source"] > r["scores"]["rejected"]

    out = tmp_path / "wrpo"
    job = load_config(WRPOJobConfig, overrides={
        "objective": "conciseness", "data.path": str(tmp_path / "pairs" / "wrpo.jsonl"), "model.name_or_path": tiny_model,
        "out": str(out), "alpha_max": 0.3, "train.workers": 2, "train.zero_stage": 2, "train.micro_batch_size": 1,
        "train.lr": 1e-3, "train.checkpoint_every": 0, "train.log_every": 1})
    metrics = run_wrpo(job)
    meta = json.loads((out / "moray.json").read_text())
    assert meta["method"] == "wrpo" and meta["alpha_max"] == 0.3 and meta["pairs"] == len(rows)
    trained, base = load_causal_lm(str(out)), load_causal_lm(tiny_model)
    assert (trained.lm_head.weight - base.lm_head.weight).abs().max() > 1e-5
    steps = metrics["step"]
    assert steps == len(rows) // 2
    assert abs(metrics["alpha"] - 0.3 * (steps - 1) / steps) < 1e-9  # the last step's α (t = steps - 1 of T)
