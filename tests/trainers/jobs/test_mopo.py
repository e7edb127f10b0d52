"""MOPO jobs (§4) on the spine: candidate files to win-rates, refusals before Ray starts, and a
2-worker ZeRO-2 run on conflicting objectives that recovers from a worker failure (slow)."""

import json
import math

import numpy as np
import pytest
import torch

from cluster.cli import main
from tests.helpers import BareEngine, assert_only_policy_files, candidates, fail_once, write_jsonl
from trainers.batches import pad_pairs
from trainers.constrained import constraint_values, mopo_ratios
from trainers.core.config import load_config
from trainers.core.models import load_causal_lm
from trainers.data import Tokenize
from trainers.jobs.mopo import MOPOJobConfig, MOPOTask, load_candidates, win_rate_tensor
from trainers.jobs.mopo import run as run_mopo


def _job(path, out, **over):
    cfg = MOPOJobConfig(objective="conciseness", out=str(out), constraints={"sentiment": 0.5})
    cfg.model.name_or_path, cfg.data.path = "unused", str(path)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def test_candidates_become_win_rates_with_absent_candidates_masked(tmp_path):
    rows = candidates(3)
    rows[1]["scores"]["sentiment"][2] = None  # an unscorable sample is dropped from its prompt
    rows[2] = {"prompt": rows[2]["prompt"], "responses": rows[2]["responses"][:2],
               "preferences": {"conciseness": [[0.5, 0.9], [0.1, 0.5]], "sentiment": [[0.5, 0.2], [0.8, 0.5]]}}
    table, report = load_candidates(_job(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "o").validate())
    assert report.kept == 3 and table.num_rows == 3
    w = win_rate_tensor(table, ["conciseness", "sentiment"])
    assert w.shape == (3, 4, 2)
    s = torch.tensor(rows[0]["scores"]["conciseness"], dtype=torch.float64)
    expect = torch.sigmoid(s[:, None] - s[None, :]).mean(1)
    torch.testing.assert_close(w[0, :, 0], expect, rtol=0, atol=1e-15)
    assert torch.isnan(w[1, 2]).all() and torch.isfinite(w[1, [0, 1, 3]]).all()
    kept = torch.tensor([rows[1]["scores"]["conciseness"][j] for j in (0, 1, 3)], dtype=torch.float64)
    torch.testing.assert_close(w[1, [0, 1, 3], 0], torch.sigmoid(kept[:, None] - kept[None, :]).mean(1), rtol=0, atol=1e-15)
    torch.testing.assert_close(w[2, :2, 1], torch.tensor([0.35, 0.65], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.isnan(w[2, 2:]).all()
    # every prompt's usable candidates average 1/2 on every objective: the sampler's own level
    means = torch.nanmean(w, dim=1)
    torch.testing.assert_close(means, torch.full_like(means, 0.5), rtol=0, atol=1e-12)
    # absent candidates repeat a kept text so every row holds n sequences
    assert table.column("cand_2").to_pylist()[1] == rows[1]["responses"][0]


def test_bad_rows_unknown_objectives_and_infeasible_thresholds_fail_before_ray(tmp_path):
    import ray

    rows = candidates(4)
    rows[1]["responses"] = ["only one"]
    rows[2]["scores"]["sentiment"] = [1, 2]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"responses must be a list of at least 2.*row 1.*scores.sentiment must be a list of 4"):
        run_mopo(_job(path, tmp_path / "o"))
    good = write_jsonl(tmp_path / "good.jsonl", candidates(4))
    with pytest.raises(ValueError, match="no scores or preferences for objective 'harmlessness'"):
        run_mopo(_job(good, tmp_path / "o", constraints={"harmlessness": 0.5}))
    with pytest.raises(ValueError, match="sentiment: threshold 0.9900 > best achievable"):
        run_mopo(_job(good, tmp_path / "o", constraints={"sentiment": 0.99}))
    opposed = candidates(4)  # harmlessness is sentiment reversed: 0.6 on both is out of reach together
    for r in opposed:
        r["scores"]["harmlessness"] = [-v for v in r["scores"]["sentiment"]]
    both = write_jsonl(tmp_path / "opposed.jsonl", opposed)
    with pytest.raises(ValueError, match="each is within reach alone but not together"):
        run_mopo(_job(both, tmp_path / "o", constraints={"sentiment": 0.6, "harmlessness": 0.6}))
    with pytest.raises(ValueError, match="degenerate"):  # exactly the best achievable: only on the boundary
        run_mopo(_job(both, tmp_path / "o", constraints={"sentiment": 0.5, "harmlessness": 0.5}))
    with pytest.raises(ValueError, match="win-rate in"):
        run_mopo(_job(good, tmp_path / "o", constraints={"sentiment": 1.5}))
    with pytest.raises(ValueError, match="cannot also be a constraint"):
        run_mopo(_job(good, tmp_path / "o", constraints={"conciseness": 0.5}))
    assert not ray.is_initialized()


@pytest.mark.slow
def test_mopo_two_workers_zero2_binds_the_constraint_and_resumes_lambda(ray_local, tiny_model, tmp_path, monkeypatch):
    """Conciseness is maximised while sentiment (which prefers the longer candidates) must keep
    its win-rate at 1/2: unconstrained, π_λ puts sentiment near 0.2, so λ rises; the run loses a
    worker at step 3 and resumes with λ and the step count from the checkpoint."""
    from pathlib import Path

    data = write_jsonl(tmp_path / "cands.jsonl", candidates(16))
    out = tmp_path / "mopo"
    job = load_config(MOPOJobConfig, overrides={
        "objective": "conciseness", "constraints": {"sentiment": 0.5}, "out": str(out), "data.path": data,
        "model.name_or_path": tiny_model, "tau": 0.1, "dual_lr": 2.0, "train.workers": 2, "train.zero_stage": 2,
        "train.micro_batch_size": 2, "train.lr": 1e-3, "train.epochs": 2, "train.checkpoint_every": 1,
        "train.log_every": 1, "train.max_failures": 1})
    failed = fail_once(monkeypatch, tmp_path / "ray_storage", step=3)
    metrics = run_mopo(job)
    assert failed.exists()  # a worker did die
    meta = json.loads((out / "moray.json").read_text())
    assert meta["method"] == "mopo" and meta["constraints"] == {"sentiment": 0.5} and meta["candidates"] == 4
    assert metrics["step"] == 8 and metrics["lambda/sentiment"] > 0.1
    assert meta["dual_init"] == "solve" and meta["constraints_met"] is True
    report = meta["constraints_report"]["sentiment"]
    assert report["estimate"] >= 0.5 - 0.01 and report["lambda"] == metrics["lambda/sentiment"]
    assert metrics["threshold/sentiment"] == 0.5 and 0 < metrics["constraint/sentiment"] < 1
    assert_only_policy_files(out)  # the checkpoints live beside the export, in ray_storage/
    states = sorted(Path(tmp_path, "ray_storage").glob("*/step_*/trainer_state.json"))
    last = json.loads(states[-1].read_text())
    assert last["step"] == 7 and last["task"]["steps"] == 7  # the dual steps before the failure were restored
    lam7 = last["task"]["lambda"][0]  # the final step's dual step starts from the checkpointed λ
    assert abs(metrics["lambda/sentiment"] - max(0.0, lam7 + 2.0 * (0.5 - metrics["constraint/sentiment"]))) < 1e-9
    trained, base = load_causal_lm(str(out)), load_causal_lm(tiny_model)
    assert (trained.lm_head.weight - base.lm_head.weight).abs().max() > 1e-5
    assert math.isfinite(metrics["loss"])


def test_mopo_task_step_takes_the_dual_step_on_the_batch_values(tiny_model, tmp_path):
    """Two micro-batches then one optimizer step: the logged constraint value is the mean over
    both batches' prompts of Σ_i ρ_i q̄_i / n, λ moves by η (b − value), and the next batch's ρ
    uses the new λ."""

    rows = candidates(4, seed=1)
    rows[3]["scores"]["sentiment"][1] = None
    job = _job(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "o", dual_lr=0.5)
    job.model.name_or_path = tiny_model
    table, _ = load_candidates(job.validate())
    cols = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    tokenized = Tokenize(tiny_model, 64, 64)(cols)
    batches = [pad_pairs(tokenized, 0, index) for index in ([0, 1], [2, 3])]
    task, engine = MOPOTask(job), BareEngine(load_causal_lm(tiny_model))
    for b in batches:
        task.losses(engine, b)
    logged = task.end_step()
    w = win_rate_tensor(table, ["conciseness", "sentiment"])
    mask = torch.isfinite(w[:, :, 0])
    rho = mopo_ratios(w[:, :, 0].nan_to_num(0), w[:, :, 1:].nan_to_num(0), torch.zeros(1, dtype=torch.float64), 0.1, mask)
    value = float(constraint_values(rho, w[:, :, 1:].nan_to_num(0), mask)[0])
    assert abs(logged["constraint/sentiment"] - value) < 1e-12 and value < 0.5
    assert abs(logged["lambda/sentiment"] - 0.5 * (0.5 - value)) < 1e-12
    assert task.state()["steps"] == 1 and task.state()["lambda"] == [logged["lambda/sentiment"]]
    task.losses(engine, batches[0])  # now with λ > 0: the secondary objective weighs in
    again = task.end_step()
    assert again["constraint/sentiment"] > float(constraint_values(rho[:2], w[:2, :, 1:].nan_to_num(0), mask[:2])[0])


def test_final_multipliers_and_thresholds_come_from_the_task_state_even_after_a_ratchet(tiny_model, tmp_path):
    """A ratchet at the last step changes only the next step's thresholds: the final report judges the
    policy against the thresholds its last dual step used, with the λ that step reached -- read from
    the task's state (as a resumed task restores it), not from logged metrics."""
    job = _job(write_jsonl(tmp_path / "c.jsonl", candidates(4, seed=1)), tmp_path / "o", dual_lr=0.5,
               ratchet_every=1, ratchet_relax=0.5)
    job.model.name_or_path = tiny_model
    table, _ = load_candidates(job.validate())
    tokenized = Tokenize(tiny_model, 64, 64)({k: np.array(v, dtype=object) for k, v in table.to_pydict().items()})
    task, engine = MOPOTask(job), BareEngine(load_causal_lm(tiny_model))
    task.losses(engine, pad_pairs(tokenized, 0, [0, 1, 2, 3]))
    logged = task.end_step()
    state = task.state()
    assert state["thresholds"] == [0.5 * logged["constraint/sentiment"]]  # ratcheted for a next step
    resumed = MOPOTask(job)
    resumed.load_state(json.loads(json.dumps(state)))
    for s in (state, resumed.state()):
        lam, thresholds = MOPOTask.final_duals(s)
        assert lam.tolist() == [logged["lambda/sentiment"]] and thresholds.tolist() == [0.5] == [logged["threshold/sentiment"]]


@pytest.mark.slow
def test_mopo_that_ends_with_its_constraint_unmet_says_so_and_exits_non_zero(ray_local, tiny_model, tmp_path,
                                                                              capsys):
    """From λ = 0 with a small dual step, one epoch leaves sentiment below its threshold: the
    policy is exported, moray.json records the miss per constraint, the CLI exits 1 naming it;
    --accept-unmet exits 0 with the same record."""

    data = write_jsonl(tmp_path / "cands.jsonl", candidates(8))
    common = ["train", "mopo", "--objective", "conciseness", "--constraints", "sentiment=0.5", "--data", data,
              "--model", tiny_model, "--workers", "1", "--epochs", "1", "--micro-batch-size", "4",
              "--dual-init", "zero", "--dual-lr", "0.01", "--set", "train.checkpoint_every=0"]
    assert main([*common, "--out", str(tmp_path / "unmet")]) == 1
    err = capsys.readouterr().err
    assert "MOPO ended with its constraints unmet (sentiment 0." in err and "< 0.5000" in err
    meta = json.loads((tmp_path / "unmet" / "moray.json").read_text())
    report = meta["constraints_report"]["sentiment"]
    assert meta["constraints_met"] is False and report["satisfied"] is False
    assert report["threshold"] == 0.5 and report["estimate"] < 0.49 and report["lambda"] < 0.05
    assert (tmp_path / "unmet" / "model.safetensors").exists()
    assert main([*common, "--out", str(tmp_path / "accepted"), "--accept-unmet"]) == 0
    again = json.loads((tmp_path / "accepted" / "moray.json").read_text())
    assert again["constraints_met"] is False and again["constraints_report"] == meta["constraints_report"]
