"""Lock-step decoding (KV caches, left padding, per-row weights), sampling, streamed text, requests;
the decoder's in-place KV cache against transformers' DynamicCache."""

import math
import warnings

import pytest
import torch
from transformers import DynamicCache

import serving.decode
from serving.api import Limits, RequestError, parse_request
from serving.decode import LockstepDecoder, Row, Sampling, cache_argument, roomy_cache
from serving.engine import TextStream, round_weights
from serving.mixing import mix_logits
from tests.helpers import next_token_probs, sample_next
from trainers.core.models import load_causal_lm, load_tokenizer

PROMPTS = ["Write about the coffee.", "Hi", "Tell me a long story about a park and a song."]


@pytest.fixture(scope="module")
def loaded(two_policies):
    tok = load_tokenizer(two_policies["sentiment"])
    models = [load_causal_lm(p).eval() for p in two_policies.values()]
    return tok, models


def _hf_greedy(model, ids, n, eos):
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def test_unit_weights_reproduce_each_policy_greedy_in_a_padded_batch(loaded):
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    for k, model in enumerate(models):
        w = [float(j == k) for j in range(2)]
        got = dec.generate([Row(i, w, Sampling(max_tokens=24, temperature=0)) for i in ids])
        assert got == [_hf_greedy(model, i, 24, tok.eos_token_id) for i in ids]


def test_mixed_step_equals_the_mixture_of_full_forwards(loaded):
    """KV-cached lock-step decoding gives, at every step, the argmax of Σ w_k logits_k recomputed
    from scratch over the whole prefix (no state leaks between models or rows)."""
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    ids = tok(PROMPTS[0])["input_ids"]
    w = torch.tensor([0.3, 0.7])
    (got,) = dec.generate([Row(ids, w.tolist(), Sampling(max_tokens=12, temperature=0))])
    seq = list(ids)
    with torch.no_grad():
        for tok_id in got:
            logits = torch.stack([m(input_ids=torch.tensor([seq])).logits[:, -1] for m in models])
            assert int(mix_logits(logits, w).argmax()) == tok_id
            seq.append(tok_id)


def test_ignore_eos_decodes_max_tokens(loaded):
    tok, models = loaded
    eos_everywhere = LockstepDecoder(models[:1], tok.pad_token_id, range(len(tok)))  # every token ends a row
    ids = tok(PROMPTS[0])["input_ids"]
    assert len(eos_everywhere.generate([Row(ids, (1.0,), Sampling(max_tokens=5, temperature=0))])[0]) == 1
    assert len(eos_everywhere.generate([Row(ids, (1.0,), Sampling(max_tokens=5, temperature=0, ignore_eos=True))])[0]) == 5


def test_seeded_sampling_repeats_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampling(temperature=1.0, top_p=0.7)
    draws = [sample_next(logits, s, torch.Generator().manual_seed(i)) for i in range(300)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn
    assert [sample_next(logits, s, torch.Generator().manual_seed(5)) for _ in range(3)] == [draws[5]] * 3
    assert sample_next(logits, Sampling(temperature=0), torch.Generator()) == 0


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.9), (1.0, 20, 0.8), (0.5, 1, 1.0), (1.0, 500, 0.95)])
def test_next_token_distribution_equals_hf_generates_warpers(temperature, top_k, top_p):
    """Temperature, top-k, then top-p on what top-k kept: the distribution HF ``generate`` samples
    from, so a policy sampled by ``generate`` and a mix sampled here are comparable."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(300, generator=torch.Generator().manual_seed(top_k + 7), dtype=torch.float64) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    want = torch.softmax(warpers(None, logits[None].clone())[0], -1)
    got = next_token_probs(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert int((got > 0).sum()) == int((want > 0).sum())
    if top_k and top_p == 1:
        assert int((got > 0).sum()) == top_k
    if top_k == 1:
        assert sample_next(logits, Sampling(temperature=temperature, top_k=1), torch.Generator()) == int(logits.argmax())


def test_top_k_one_decodes_greedily(loaded):
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    greedy = dec.generate([Row(i, (0.4, 0.6), Sampling(max_tokens=16, temperature=0)) for i in ids])
    assert dec.generate([Row(i, (0.4, 0.6), Sampling(max_tokens=16, temperature=1.0, top_k=1, seed=3))
                         for i in ids]) == greedy


def test_text_stream_cuts_at_stop_strings_and_holds_back_partial_matches(loaded):
    tok, _ = loaded
    ids = tok("the park is lovely. The song", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, ["lovely."])
    deltas = []
    for t in ids:
        deltas.append(s.push(t))
        if s.stopped:
            break
    assert s.stopped and "".join(deltas) == "the park is "
    assert all("lov" not in d for d in deltas)
    plain = TextStream(tok, [])
    text = "".join(plain.push(t) for t in ids) + plain.flush()
    assert text == tok.decode(ids)


def test_round_weights_for_the_soup_cache():
    assert round_weights((1 / 3, 1 / 3, 1 / 3), 3) == (1 / 3, 1 / 3, 1 / 3)
    assert round_weights((0.12344, 0.87656), 3) == pytest.approx((0.123, 0.877))
    assert round_weights((1.0, 0.0), 3) == (1.0, 0.0)


LIMITS = Limits(("sentiment", "conciseness"), (0.5, 0.5), "logits", 16, 64, 128)


def test_parse_request_defaults_and_extras(loaded):
    tok, _ = loaded
    p = parse_request({"prompt": "Hi"}, False, tok, LIMITS)
    assert p.weights == (0.5, 0.5) and p.mixing == "logits" and p.sampling.max_tokens == 16 and not p.stream
    p = parse_request({"messages": [{"role": "user", "content": "Hi"}], "objective_weights": {"conciseness": 3},
                       "mixing": "soup", "stop": "x", "temperature": 0, "seed": 4, "stream": True}, True, tok, LIMITS)
    assert p.weights == (0.0, 1.0) and p.mixing == "soup" and p.stop == ["x"] and p.sampling.seed == 4 and p.stream
    assert tok.decode(p.prompt_ids).endswith("<|assistant|>")
    assert p.sampling.top_k == 0  # OpenAI semantics: no top-k unless asked
    assert parse_request({"prompt": "Hi", "top_k": 40}, False, tok, LIMITS).sampling.top_k == 40
    assert parse_request({"prompt": "Hi", "top_k": -1}, False, tok, LIMITS).sampling.top_k == 0  # vLLM's "off"


@pytest.mark.parametrize("body, chat, param", [
    ({"prompt": "Hi", "objective_weights": {"helpful": 1}}, False, "objective_weights"),
    ({"prompt": "Hi", "objective_weights": {"sentiment": -1}}, False, "objective_weights"),
    ({"prompt": "Hi", "objective_weights": {"sentiment": math.nan}}, False, "objective_weights"),
    ({"prompt": "Hi", "objective_weights": {"sentiment": 0}}, False, "objective_weights"),
    ({"prompt": "Hi", "objective_weights": [1, 2, 3]}, False, "objective_weights"),
    ({"prompt": "Hi", "objective_weights": "sentiment"}, False, "objective_weights"),
    ({"prompt": "Hi", "temperature": 2.5}, False, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, False, "top_p"),
    ({"prompt": "Hi", "top_k": -2}, False, "top_k"),
    ({"prompt": "Hi", "top_k": 2.5}, False, "top_k"),
    ({"prompt": "Hi", "max_tokens": 0}, False, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 65}, False, "max_tokens"),
    ({"prompt": "word " * 200}, False, "prompt"),
    ({"prompt": "Hi", "n": 2}, False, "n"),
    ({"prompt": "Hi", "mixing": "average"}, False, "mixing"),
    ({"prompt": "Hi", "stop": ["a", ""]}, False, "stop"),
    ({"prompt": "Hi", "seed": 1.5}, False, "seed"),
    ({"prompt": "Hi", "ignore_eos": "yes"}, False, "ignore_eos"),
    ({"prompt": "Hi", "stream": 1}, False, "stream"),
    ({"prompt": "Hi", "mixing": "blend"}, False, "mixing"),
    ({"prompt": "Hi", "mixing": ["soup"]}, False, "mixing"),
    ({"prompt": ["a", "b"]}, False, "prompt"),
    ({}, False, "prompt"),
    ({"messages": [{"role": "robot", "content": "x"}]}, True, "messages"),
    ({"messages": []}, True, "messages"),
])
def test_parse_request_refuses_each_bad_field(loaded, body, chat, param):
    tok, _ = loaded
    with pytest.raises(RequestError) as e:
        parse_request(body, chat, tok, LIMITS)
    assert e.value.param == param and str(e.value)
    if param == "mixing":  # the one check of a mode, its message naming the modes
        assert str(e.value) == f"mixing must be 'logits' or 'soup', got {body['mixing']!r}"


def test_rows_that_finish_leave_the_batch_without_changing_the_others(loaded):
    """Rows with different lengths and weights in one batch: as each finishes, it leaves the batch
    and its KV-cache rows are dropped; every row still decodes exactly as it does alone."""
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    rows = [Row(tok(p)["input_ids"], w, Sampling(max_tokens=n, temperature=0, ignore_eos=True))
            for p, w, n in zip(PROMPTS, [(1.0, 0.0), (0.4, 0.6), (0.0, 1.0)], [3, 17, 9])]
    together = dec.generate(rows)
    assert [len(t) for t in together] == [3, 17, 9]
    assert together == [dec.generate([r])[0] for r in rows]


def test_padding_no_remaining_row_needs_leaves_with_the_row_that_needed_it(loaded):
    """The longest prompt's row finishes first: the columns that only padded the others are dropped
    from the mask and the KV caches (every later forward attends over fewer positions), and each
    row still decodes exactly as it does alone."""
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    greedy = lambda n: Sampling(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    rows = [Row(tok(PROMPTS[2])["input_ids"], (0.5, 0.5), greedy(2)), Row(tok(PROMPTS[1])["input_ids"], (1.0, 0.0), greedy(6))]
    widths = []
    hooks = [m.register_forward_pre_hook(lambda _, a, kw: widths.append(kw["attention_mask"].shape[1]), with_kwargs=True)
             for m in models]
    try:
        together = dec.generate(rows)
    finally:
        for h in hooks:
            h.remove()
    assert together == [dec.generate([r])[0] for r in rows]
    long, short = (len(r.prompt_ids) for r in rows)
    assert widths[-1] == short + 5 < long + 5  # the last step: the short row's own positions only


def test_row_probs_of_a_mixed_batch_equal_each_row_alone():
    from serving.decode import row_probs, sample_rows

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    samplings = [Sampling(temperature=0.7, top_k=20), Sampling(temperature=1.0, top_p=0.8),
                 Sampling(temperature=1.3, top_k=5, top_p=0.9), Sampling(temperature=0)]
    got = row_probs(logits, samplings)
    for i, s in enumerate(samplings[:3]):
        assert torch.allclose(got[i], next_token_probs(logits[i], s), atol=1e-12, rtol=0)
    # each row's draw depends only on its own generator: the same seed gives the same token alone
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    batch = sample_rows(logits, samplings, gens()).tolist()
    alone = [int(sample_rows(logits[i:i + 1], [s], [g])[0]) for i, (s, g) in enumerate(zip(samplings, gens()))]
    assert batch == alone and batch[3] == int(logits[3].argmax())
    assert all(got[i, t] > 0 for i, t in enumerate(batch[:3]))  # never outside top-k / top-p


@pytest.mark.parametrize("join_after", [1, 4])
def test_rows_that_join_a_running_batch_decode_as_they_would_alone(loaded, join_after):
    """Continuous batching: rows joining after some steps (one with a one-token prompt) are
    prefilled and stacked onto the running KV caches; every row's tokens equal its decoding alone,
    and a short joiner finishes while the long row is still running."""
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    greedy = lambda n: Sampling(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    first = Row(tok(PROMPTS[2])["input_ids"], (0.3, 0.7), greedy(16))
    joiners = [Row(tok(PROMPTS[0])["input_ids"], (1.0, 0.0), greedy(3)), Row([tok(PROMPTS[1])["input_ids"][0]], (0.5, 0.5), greedy(6))]
    asked, finished = [], []

    def more(n):
        asked.append(n)
        return joiners if len(asked) == join_after else []

    out = dec.generate([first], more=more, on_finish=finished.append)
    assert out == [dec.generate([r])[0] for r in [first, *joiners]]
    assert finished.index(1) < finished.index(0)  # the 3-token joiner ended before the long row


@pytest.mark.parametrize("joiners", [1, 2])
def test_rows_that_join_as_others_finish_take_their_places(loaded, joiners, monkeypatch):
    """A row that joins as another finishes takes its place in the running KV caches (its prefill
    written into that row's last positions, the rest masked): no cache is stacked for it, and
    every row still decodes exactly as it does alone. A second joiner, with no place left, is
    stacked as before."""
    tok, models = loaded
    dec = LockstepDecoder(models, tok.pad_token_id, [tok.eos_token_id])
    greedy = lambda n: Sampling(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    start = [Row(tok(PROMPTS[2])["input_ids"], (0.3, 0.7), greedy(14)), Row(tok(PROMPTS[1])["input_ids"], (1.0, 0.0), greedy(3))]
    late = [Row(tok(PROMPTS[0])["input_ids"], (0.6, 0.4), greedy(6)), Row(tok(PROMPTS[1])["input_ids"], (0.0, 1.0), greedy(4))]
    asked, stacked = [], []
    real = serving.decode._stack_caches
    monkeypatch.setattr(serving.decode, "_stack_caches", lambda *a: stacked.append(a[2]) or real(*a))

    def more(n):
        asked.append(n)
        return late[:joiners] if len(asked) == 3 else []  # after the step where the 3-token row ends

    out = dec.generate(start, more=more)
    assert asked[2] == 1
    assert stacked == [1] * (joiners - 1) * len(models)  # the first joiner took the finished row's place
    assert out == [dec.generate([r])[0] for r in [*start, *late[:joiners]]]


def test_every_policys_forward_is_launched_before_any_result_is_read(loaded):
    """Logits mode on K GPUs: the K forwards of a step (and of a joining row's prefill) are all
    issued before any logits are copied to the decoder's device, and the inputs are on every
    model's device before the first forward, so no GPU waits for another's forward. On the CPU the
    order of the operations is what can be checked: the trace outside the models' forwards."""
    from torch.overrides import TorchFunctionMode

    tok, models = loaded
    trace, depth = [], [0]
    handles = []
    for k, m in enumerate(models):
        handles.append(m.register_forward_pre_hook(
            lambda mod, a, k=k: (trace.append(f"forward {k}"), depth.__setitem__(0, depth[0] + 1))[0]))
        handles.append(m.register_forward_hook(lambda mod, a, o: depth.__setitem__(0, depth[0] - 1)))

    class Copies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and depth[0] == 0:
                trace.append("logits read" if args[0].is_floating_point() else "input copy")
            return func(*args, **(kwargs or {}))

    rows = [Row(tok(p)["input_ids"], (0.5, 0.5), Sampling(max_tokens=4, temperature=0)) for p in PROMPTS[:2]]
    joining = [Row(tok(PROMPTS[2])["input_ids"], (0.3, 0.7), Sampling(max_tokens=3, temperature=0))]
    try:
        with Copies():
            got = LockstepDecoder(models, 0, []).generate(
                rows, more=lambda n, c=[]: (c.append(n), joining if len(c) == 1 else [])[1])
    finally:
        for h in handles:
            h.remove()
    starts = [i for i, e in enumerate(trace) if e == "forward 0"]
    assert len(starts) >= 5  # the steps and the prefill of the joining row
    for i in starts:
        assert trace[i:i + len(models)] == [f"forward {k}" for k in range(len(models))], trace[i - 3:i + 4]
    assert len(got) == 3 and [len(g) for g in got] == [4, 4, 3]  # the values: the tests above


class _BeforeTheRename(torch.nn.Module):
    """A policy whose forward takes its KV cache as ``past_key_values`` only, as transformers'
    forwards did before ``cache``: the same weights as ``model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep,
                          **{cache_argument(type(self.model)): past_key_values})


def test_the_kv_cache_goes_by_the_name_the_forward_takes(loaded):
    """No deprecation warning from the installed transformers (its ``past_key_values`` goes in 5.40),
    and a forward that knows only ``past_key_values`` decodes the same tokens."""
    tok, models = loaded
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    rows = [Row(i, [1.0], Sampling(max_tokens=12, temperature=0)) for i in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = LockstepDecoder(models[:1], tok.pad_token_id, [tok.eos_token_id]).generate(rows)
        older = LockstepDecoder([_BeforeTheRename(models[0])], tok.pad_token_id, [tok.eos_token_id]).generate(rows)
    assert cache_argument(_BeforeTheRename) == "past_key_values"
    assert got == older == [_hf_greedy(models[0], i, 12, tok.eos_token_id) for i in ids]


def _step(model, cache, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits


def test_roomy_cache_decodes_exactly_as_the_dynamic_cache(tiny_model, monkeypatch):
    monkeypatch.setattr(serving.decode, "GROW_MIN", 3)  # the buffers grow several times in 12 steps
    model = load_causal_lm(tiny_model).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, :3] = mask[1, :5] = 0  # left padding; rows 2 and 3 pad nothing
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    caches = [DynamicCache(), roomy_cache()()]
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
    cache = roomy_cache()()
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        ptrs = [layer._k.data_ptr() for layer in cache.layers]
        for t in range(20):
            model(input_ids=ids[:, :1], position_ids=torch.full((2, 1), 5 + t), cache=cache, use_cache=True)
    assert [layer._k.data_ptr() for layer in cache.layers] == ptrs  # 25 positions fit the first buffer
    assert all(layer.keys.shape[2] == 25 and layer.keys.data_ptr() == layer._k.data_ptr() for layer in cache.layers)
