"""Reference log-probs from the policy's own first pass: the first step's log-ratios are exactly 0
(same batches, same weights), in the training dtype; the table survives a checkpoint."""

import numpy as np
import torch

from tests.helpers import BareEngine, synthetic_pairs
from trainers.core.models import load_tokenizer
from trainers.data import Tokenize
from trainers.jobs.dpo import DPOJobConfig, DPOTask
from trainers.reference import ReferenceTable
from trainers.task import build_policy


def _batches(tiny_model, task):
    rows = synthetic_pairs(12, seed=4)
    cols = {"idx": np.arange(12), "is_chat": np.zeros(12, dtype=bool),
            **{k: np.array([r[k] for r in rows], dtype=object) for k in ("prompt", "chosen", "rejected")}}
    tokenized = Tokenize(tiny_model, 64, 64)(cols)
    pad = load_tokenizer(tiny_model).pad_token_id
    return [task.collate(tokenized, pad, index) for index in ([3, 0, 7, 5], [1, 2, 4, 6], [8, 9, 10, 11])]


def test_first_step_log_ratios_are_exactly_zero_and_the_table_round_trips(tiny_model, tmp_path):
    cfg = DPOJobConfig(objective="s")
    cfg.model.name_or_path = tiny_model
    task = DPOTask(cfg)
    assert task.needs_reference and cfg.train.packing
    model = build_policy(cfg.model).train()
    batches = _batches(tiny_model, task)
    table = ReferenceTable.compute(model, batches, torch.device("cpu"))
    assert table.values.dtype == np.float64 and table.values.shape == (12, 2) and table.names == ["chosen", "rejected"]
    assert model.training  # the pass leaves the mode as it found it
    for batch in batches:
        losses, stats = task.losses(BareEngine(model), table.attach(batch))
        assert stats["chosen_reward"].abs().max().item() == 0.0 and stats["rejected_reward"].abs().max().item() == 0.0
        assert torch.allclose(losses, torch.full_like(losses, float(np.log(2))), rtol=0, atol=1e-7)
    table.save(str(tmp_path), rank=1)
    again = ReferenceTable.load(str(tmp_path), rank=1)
    assert ReferenceTable.load(str(tmp_path), rank=0) is None
    batch = batches[1]
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(again.attach(batch)[k], table.attach(batch)[k])
