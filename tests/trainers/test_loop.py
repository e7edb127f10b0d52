"""The loop's per-step sums: no host read per micro-batch, one per optimizer step."""

import pytest
import torch

from trainers.loop import StepSums


def test_micro_batches_add_on_the_device_and_the_step_reads_once(monkeypatch):
    reads = []
    for name in ("item", "cpu", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: (reads.append(_n), _r(self, *a, **k))[1])
    sums = StepSums(torch.device("cpu"))
    for i in range(4):
        losses = torch.full((2,), float(i))
        stats = {"reward_margin": torch.tensor([1.0, 3.0]), "accuracy": torch.tensor([1.0, 0.0])}
        sums.add(losses, stats, torch.ones(2, 5, dtype=torch.long))
    assert reads == []  # four micro-batches, no host read
    out = sums.reduce(seconds=2.0, world=1)
    assert reads.count("cpu") == 1 and "item" not in reads
    assert out["loss"] == pytest.approx(1.5) and out["reward_margin"] == pytest.approx(2.0)
    assert out["accuracy"] == pytest.approx(0.5) and out["step_pairs"] == 8 and out["tokens_per_s"] == 20
