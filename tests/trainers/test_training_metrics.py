"""Training metrics: which gauges a step's metrics set, and every key a task reports -- run on a
micro-batch, not read from its source -- is published or deliberately kept to the job's metrics."""

import numpy as np

from tests.helpers import (
    BareEngine,
    candidates,
    multi_batch,
    multi_rows,
    preference_batch,
    synthetic_pairs,
    write_jsonl,
)
from trainers.batches import pad_pairs
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.data import Tokenize
from trainers.jobs.dpo import DPOJobConfig, DPOTask
from trainers.jobs.gapo import GAPOJobConfig, GAPOTask, OnlineGAPOTask
from trainers.jobs.mopo import MOPOJobConfig, MOPOTask, load_candidates
from trainers.jobs.wrpo import WRPOJobConfig, WRPOTask
from trainers.rollout import TokenizePrompts
from trainers.training_metrics import TRAIN_FAMILIES, TRAIN_SCALARS, training_series

# per-row figures a task reports that stay in the job's metrics (Ray Train's history), not on the dashboard
KEPT_TO_THE_JOB = {"chosen_reward", "rejected_reward", "logp_best", "logp_worst"}


def test_training_series_tags_per_objective_entries_with_their_objective():
    step = {"loss": 0.5, "accuracy": 0.75, "step": 3, "step_rows": 8.0, "epoch": 0, "history": [],
            "alpha/sentiment": 0.3, "alpha/conciseness": 0.7, "grad_norm/sentiment": 2.0, "grad_cosine": -0.2,
            "lambda/sentiment": 0.1, "constraint/sentiment": 0.45, "reward/sentiment": float("nan"),
            "unknown/sentiment": 1.0, "chosen_reward": 0.1, "flag": True}
    got = {(spec.name, objective): value for spec, objective, value in training_series(step)}
    assert got == {
        ("moray_train_loss", None): 0.5, ("moray_train_accuracy", None): 0.75, ("moray_train_step", None): 3.0,
        ("moray_train_gapo_alpha", "sentiment"): 0.3, ("moray_train_gapo_alpha", "conciseness"): 0.7,
        ("moray_train_gapo_grad_norm", "sentiment"): 2.0, ("moray_train_gapo_grad_cosine", None): -0.2,
        ("moray_train_mopo_lambda", "sentiment"): 0.1, ("moray_train_mopo_constraint", "sentiment"): 0.45,
    }
    # WRPO's scalar alpha and GAPO's alpha/<k> are different series
    assert training_series({"alpha": 0.05})[0][0].name == "moray_train_wrpo_alpha"


def _reported(task, engine, batch):
    _, stats = task.losses(engine, batch)
    return set(stats) | set(task.end_step())


def test_every_key_a_task_reports_is_published(tiny_model, tmp_path):
    tok, ref = load_tokenizer(tiny_model), load_causal_lm(tiny_model).eval()
    engine = BareEngine(load_causal_lm(tiny_model))
    keys = _reported(DPOTask(DPOJobConfig(objective="s")), engine, preference_batch(tok, synthetic_pairs(4), ref))
    rows = [{**r, "source": "Truly wonderful work."} for r in synthetic_pairs(4)]
    keys |= _reported(WRPOTask(WRPOJobConfig(objective="s")), engine,
                      preference_batch(tok, rows, ref, ("chosen", "rejected", "source")))
    keys |= _reported(GAPOTask(GAPOJobConfig(objectives=["sentiment", "conciseness"])), engine,
                      multi_batch(tok, multi_rows(4), ref))
    mopo = MOPOJobConfig(objective="conciseness", out=str(tmp_path / "o"), constraints={"sentiment": 0.5})
    mopo.model.name_or_path, mopo.data.path = tiny_model, write_jsonl(tmp_path / "c.jsonl", candidates(2))
    table, _ = load_candidates(mopo.validate())
    tokenized = Tokenize(tiny_model, 64, 64)({k: np.array(v, dtype=object) for k, v in table.to_pydict().items()})
    keys |= _reported(MOPOTask(mopo), engine, pad_pairs(tokenized, tok.pad_token_id, [0, 1]))
    online = GAPOJobConfig(objectives=["sentiment", "conciseness"], online=True, samples_per_prompt=2, max_new_tokens=4)
    online.model.name_or_path = tiny_model
    task = OnlineGAPOTask(online)
    module = task.build()
    prompts = TokenizePrompts(tiny_model, 64, 64)({"idx": np.arange(2), "prompt": np.array(["Hi", "Hello"], dtype=object)})
    keys |= _reported(task, BareEngine(module), task.collate(prompts, tok.pad_token_id, [0, 1]))

    published = {k for k in keys if k in TRAIN_SCALARS or k.partition("/")[0] in TRAIN_FAMILIES}
    assert keys - published <= KEPT_TO_THE_JOB, keys - published - KEPT_TO_THE_JOB
    assert {"reward_margin", "accuracy", "alpha", "grad_cosine", "kl", "empty_fraction", "alpha/sentiment",
            "grad_norm/conciseness", "loss/sentiment", "margin/conciseness", "lambda/sentiment",
            "constraint/sentiment", "threshold/sentiment", "reward/sentiment"} <= published
