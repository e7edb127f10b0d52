"""The in-place KV cache: the same keys, values and logits as transformers' DynamicCache through
prefill, steps, buffer growth, rows leaving and leading positions dropped; steps within the buffer
write in place."""

import torch
from transformers import DynamicCache

import serving.kv_cache
from serving.kv_cache import RoomyCache
from trainers.core.models import load_causal_lm


def _step(model, cache, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


def test_roomy_cache_decodes_exactly_as_the_dynamic_cache(tiny_model, monkeypatch):
    monkeypatch.setattr(serving.kv_cache, "GROW_MIN", 3)  # the buffers grow several times in 12 steps
    model = load_causal_lm(tiny_model).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, :3] = mask[1, :5] = 0  # left padding; rows 2 and 3 pad nothing
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    caches = [DynamicCache(), RoomyCache()]
    grew = 0
    with torch.no_grad():
        got = [_step(model, c, ids, mask, pos) for c in caches]
        torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)
        for t in range(12):
            if t == 4:  # rows 2 and 3 leave: their keys and values go, the others' stay in place
                keep = torch.tensor([0, 1])
                for c in caches:
                    c.batch_select_indices(keep)
                mask, pos = mask[keep], pos[keep]
            if t == 6:  # three columns only pad the rows left: dropped from the roomy cache alone
                caches[1].trim_left(3)
                before = caches[0]
                for layer in before.layers:
                    layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
                mask = mask[:, 3:]
            step = torch.randint(3, 200, (mask.shape[0], 1), generator=g)
            mask = torch.cat([mask, torch.ones_like(step)], 1)
            pos = pos[:, -1:] + 1
            ptr = caches[1].layers[0]._k.data_ptr()
            got = [_step(model, c, step, mask, pos) for c in caches]
            torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)
            grew += caches[1].layers[0]._k.data_ptr() != ptr
            for a, b in zip(caches[0].layers, caches[1].layers):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == mask.shape[1]
    # a buffer is replaced only when full or when rows leave (indexing copies it): 12 steps, few copies
    assert 1 <= grew <= 6


def test_a_step_inside_the_buffer_writes_in_place(tiny_model):
    model = load_causal_lm(tiny_model).eval()
    cache = RoomyCache()
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        ptrs = [layer._k.data_ptr() for layer in cache.layers]
        for t in range(20):
            model(input_ids=ids[:, :1], position_ids=torch.full((2, 1), 5 + t), past_key_values=cache, use_cache=True)
    assert [layer._k.data_ptr() for layer in cache.layers] == ptrs  # 25 positions fit the first buffer
    assert all(layer.keys.shape[2] == 25 and layer.keys.data_ptr() == layer._k.data_ptr() for layer in cache.layers)
