"""The loop's per-step sums: no host read per micro-batch, one per optimizer step; its epoch of a Ray
Data shard (slow)."""

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
    assert out["accuracy"] == pytest.approx(0.5) and out["step_rows"] == 8 and out["tokens_per_s"] == 20


@pytest.mark.slow
def test_epoch_batches_tokenize_and_cut_through_ray_datas_current_collate_api(ray_local, tiny_model, tmp_path):
    """A worker's epoch over a Ray Data shard: every row once, in micro-batches, and no deprecation
    warning from the call (a plain function as iter_torch_batches' collate_fn is deprecated)."""
    import warnings
    from types import SimpleNamespace

    import ray.data

    from tests.helpers import synthetic_pairs, write_jsonl
    from trainers.data import Tokenize, load_pairs
    from trainers.job_config import DataConfig
    from trainers.loop import epoch_batches

    table, _ = load_pairs(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(10))), "s")
    t = SimpleNamespace(micro_batch_size=3, bucket_batches=2, seed=0, shuffle=True)
    collate = lambda rows, pad_id, index: {"idx": torch.as_tensor(rows["idx"][index])}  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(epoch_batches(ray.data.from_arrow(table).iterator(), 0, t, 0, Tokenize(tiny_model, 64, 32),
                                     collate))
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert sorted(torch.cat([b["idx"] for b in batches]).tolist()) == list(range(10))
    assert max(len(b["idx"]) for b in batches) == 3
