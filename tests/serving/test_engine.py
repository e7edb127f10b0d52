"""The replica's soup cache: exact merges, at most ``size`` merged copies, memory reused on eviction."""

import torch

from serving.engine import SoupCache
from serving.mixing import soup_state_dicts
from trainers.core.models import load_causal_lm


def test_soup_cache_merges_exactly_and_recycles_evicted_copies(tiny_model):
    models = [load_causal_lm(tiny_model).eval() for _ in range(3)]
    with torch.no_grad():
        for k, m in enumerate(models[1:], 1):
            for p in m.parameters():
                p.add_(0.01 * k * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
    cache = SoupCache(models, size=2)
    w = (0.2, 0.3, 0.5)
    merged, hit = cache.get(w)
    assert not hit and all(merged is not m for m in models)
    want = soup_state_dicts([m.state_dict() for m in models], w)
    assert all(torch.equal(t, want[k]) for k, t in merged.state_dict().items())
    assert cache.get(w) == (merged, True)
    assert cache.get((0.0, 1.0, 0.0))[0] is models[1]  # a unit vector is the policy itself
    ptr = merged.lm_head.weight.data_ptr()
    second, _ = cache.get((0.5, 0.5, 0.0))  # evicts w's copy (least recently used) and merges into it
    assert second is merged and second.lm_head.weight.data_ptr() == ptr
    want = soup_state_dicts([m.state_dict() for m in models[:2]], (0.5, 0.5))
    assert all(torch.equal(t, want[k]) for k, t in second.state_dict().items())
    for i in range(6):  # never more than `size` entries, so never more than `size` copies
        cache.get((0.1 * i, 0.5, 0.5 - 0.1 * i))
        copies = {id(m) for m in cache.cache.values()} - {id(m) for m in models}
        assert len(cache.cache) <= 2 and len(copies) <= 2


def test_policies_spread_over_the_replica_gpus():
    from serving.engine import policy_devices

    assert [str(d) for d in policy_devices(3, 2)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [str(d) for d in policy_devices(2, 0)] == ["cpu", "cpu"]


def test_serve_dtype_defaults_to_auto_and_gpu_options_are_checked(tiny_model):
    import pytest

    from serving.config import ServeConfig
    from serving.engine import MixEngine

    cfg = ServeConfig(policies={"a": tiny_model}).validate()
    assert cfg.dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        ServeConfig(policies={"a": tiny_model}, dtype="float16").validate()
    with pytest.raises(ValueError, match="set num_gpus"):
        ServeConfig(policies={"a": tiny_model}, device_map="auto").validate()
    if not torch.cuda.is_available():  # a GPU replica without CUDA stops at once, before loading anything
        with pytest.raises(RuntimeError, match="CUDA sees none"):
            MixEngine(ServeConfig(policies={"a": tiny_model}, num_gpus=1).validate())
