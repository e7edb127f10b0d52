"""The replica engine: soup cache (background merges, bounded copies), GPU placement, serve options, continuous batching."""

import pytest
import torch

from serving.engine import SoupCache
from serving.mixing import soup_state_dicts
from trainers.core.models import load_causal_lm


def test_soup_cache_merges_in_the_background_exactly_within_its_byte_budget(tiny_model):
    models = [load_causal_lm(tiny_model).eval() for _ in range(3)]
    with torch.no_grad():
        for k, m in enumerate(models[1:], 1):
            for p in m.parameters():
                p.add_(0.01 * k * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
    one = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
    cache = SoupCache(models, budget_bytes=2 * one + one // 2)  # room for two merged copies
    w = (0.2, 0.3, 0.5)
    assert cache.get(w) == (None, False) and not cache.merging  # asked once: not worth a merge yet
    assert cache.get(w) == (None, False)  # hot: merging starts elsewhere, the caller does not wait
    cache.wait()
    merged, hit = cache.get(w)
    assert hit and all(merged is not m for m in models)
    want = soup_state_dicts([m.state_dict() for m in models], w)
    assert all(torch.equal(t, want[k]) for k, t in merged.state_dict().items())
    assert cache.get((0.0, 1.0, 0.0)) == (models[1], True)  # a unit vector is the policy itself
    for i in range(1, 5):  # never more bytes than the budget, the merge in flight included
        cache.get((0.1 * i, 0.5, 0.5 - 0.1 * i))
        cache.get((0.1 * i, 0.5, 0.5 - 0.1 * i))
        assert cache.held_bytes() <= cache.budget
        cache.wait()
        assert len(cache.cache) == 2 and cache.held_bytes() <= cache.budget
    assert w not in cache.cache and cache.misses == 10
    small = SoupCache(models, budget_bytes=one - 1)  # no copy fits: every batch stays a per-row soup
    for _ in range(3):
        assert small.get(w) == (None, False)
    assert not small.merging and not small.cache


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
    with pytest.raises(ValueError, match="soup_cache_mb must be a finite number >= 0"):
        ServeConfig(policies={"a": tiny_model}, soup_cache_mb=-1).validate()
    if not torch.cuda.is_available():  # a GPU replica without CUDA stops at once, before loading anything
        with pytest.raises(RuntimeError, match="CUDA sees none"):
            MixEngine(ServeConfig(policies={"a": tiny_model}, num_gpus=1).validate())


@pytest.mark.parametrize("mixing", ["logits", "soup"])
def test_a_short_request_joins_the_running_batch_and_is_answered_first(two_policies, mixing):
    """Continuous batching in the engine: a short request arriving while a long one decodes gets
    its first token a few steps later and its answer before the long one ends; both answers equal
    what each gets alone in logits mode. (In soup mode the long one switches from its merged model
    to the per-row soup when the other vector joins: equal to 1e-5 in the logits, see
    test_rowsoup.py, which greedy decoding of random tiny models does not survive bit for bit.)"""
    import threading
    import time

    from serving.api import Limits, parse_request
    from serving.config import ServeConfig
    from serving.engine import MixEngine

    engine = MixEngine(ServeConfig(policies=two_policies, max_tokens_limit=64, batch_wait_ms=0).validate())
    limits = Limits(list(two_policies), (0.5, 0.5), mixing, 16, 64, 512)
    tok = engine.tokenizer

    def ask(prompt, n, weights, log):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "mixing": mixing,
                "objective_weights": weights}
        done = threading.Event()
        parts = []

        def emit(event):
            log.append((time.perf_counter(), event["type"], event))
            if event["type"] == "delta":
                parts.append(event["text"])
            elif event["type"] == "done":
                done.set()
            else:
                raise AssertionError(event)
        engine.submit(parse_request(body, False, tok, limits), emit)
        return done, parts

    try:
        alone = {}
        for name, prompt, n, w in (("long", "Write about the coffee.", 48, {"sentiment": 0.3, "conciseness": 0.7}),
                                   ("short", "Hi", 4, {"sentiment": 0.9, "conciseness": 0.1})):
            done, parts = ask(prompt, n, w, [])
            assert done.wait(120)
            alone[name] = "".join(parts)
            while engine.stats[f"{mixing}_requests"] < len(alone):  # its batch is over: the next is alone
                time.sleep(0.005)
        long_log, short_log = [], []
        long_done, long_parts = ask("Write about the coffee.", 48, {"sentiment": 0.3, "conciseness": 0.7}, long_log)
        while sum(1 for _, t, _ in long_log if t == "delta") < 8:  # the long request is well under way
            time.sleep(0.005)
        sent = time.perf_counter()
        short_done, short_parts = ask("Hi", 4, {"sentiment": 0.9, "conciseness": 0.1}, short_log)
        assert short_done.wait(120) and long_done.wait(120)
        short_end, _, short_event = next(x for x in short_log if x[1] == "done")
        long_end = next(t for t, e, _ in long_log if e == "done")
        assert short_end < long_end and short_event["batch"] >= 2  # it joined, and left first
        steps_before_first = sum(1 for t, e, _ in long_log if sent < t < short_log[0][0] and e == "delta")
        assert steps_before_first <= 3
        assert mixing == "soup" or ("".join(short_parts), "".join(long_parts)) == (alone["short"], alone["long"])
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(two_policies):
    """A client that goes away (``job.cancelled``) ends its row at the next token; the request
    decoding beside it finishes in full."""
    import threading

    from serving.api import Limits, parse_request
    from serving.config import ServeConfig
    from serving.engine import MixEngine

    engine = MixEngine(ServeConfig(policies=two_policies, max_tokens_limit=64, batch_wait_ms=50).validate())
    limits = Limits(list(two_policies), (0.5, 0.5), "logits", 16, 64, 512)
    events = {"a": [], "b": []}
    done = {k: threading.Event() for k in events}
    jobs = {}

    def emit_for(name):
        def emit(event):
            events[name].append(event)
            if name == "a" and sum(e["type"] == "delta" for e in events["a"]) == 3:
                jobs["a"].cancelled = True
            if event["type"] in ("done", "error"):
                done[name].set()
        return emit

    try:
        for name in ("a", "b"):
            body = {"prompt": "Write about the coffee.", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
            jobs[name] = engine.submit(parse_request(body, False, engine.tokenizer, limits), emit_for(name))
        assert done["a"].wait(120) and done["b"].wait(120)
        a_done, b_done = events["a"][-1], events["b"][-1]
        assert a_done["type"] == b_done["type"] == "done"
        assert a_done["tokens"] < 10 and b_done["tokens"] == 48 and b_done["batch"] == 2
    finally:
        engine.close()


def test_lora_policies_batch_per_request_soups_over_one_base_forward(tiny_model, tmp_path):
    """LoRA policies: soup requests with different vectors decode in one batch on the base plus
    the adapters, each answer the greedy text of its own ``moray mix soup --lora`` checkpoint."""
    import threading

    from serving.api import Limits, parse_request
    from serving.config import ServeConfig
    from serving.engine import MixEngine
    from serving.offline.soup import soup_policies
    from tests.helpers import make_lora_policy

    dirs = {k: make_lora_policy(tiny_model, tmp_path / k, seed, k) for k, seed in (("a", 1), ("b", 2))}
    vectors = [(0.2, 0.8), (0.7, 0.3), (0.5, 0.5)]

    def answers(policies, weights, mixing="soup"):
        engine = MixEngine(ServeConfig(policies=policies, max_tokens_limit=64, batch_wait_ms=200).validate())
        limits = Limits(list(policies), (1.0,) * len(policies), mixing, 16, 64, 512)
        texts, events = [[] for _ in weights], [threading.Event() for _ in weights]
        try:
            for i, w in enumerate(weights):
                body = {"prompt": "Write about the coffee.", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                        "mixing": mixing, "objective_weights": dict(zip(policies, w))}

                def emit(event, i=i):
                    if event["type"] == "delta":
                        texts[i].append(event["text"])
                    else:
                        assert event["type"] == "done", event
                        texts[i].append(event["batch"])
                        events[i].set()
                engine.submit(parse_request(body, False, engine.tokenizer, limits), emit)
            assert all(e.wait(120) for e in events)
            return engine.row_soup.kind, texts
        finally:
            engine.close()

    kind, got = answers(dirs, vectors)
    assert kind == "lora" and all(t[-1] == len(vectors) for t in got)  # one batch of per-row soups
    for w, texts in zip(vectors, got):
        merged = soup_policies(dirs, w, str(tmp_path / f"soup{w[0]}"), lora=True)
        _, (alone,) = answers({"a": merged}, [(1.0,)])
        assert "".join(texts[:-1]) == "".join(alone[:-1])


def test_each_policy_loads_in_the_serving_dtype_straight_onto_its_device(two_policies, monkeypatch):
    """The host never holds the K policies at once: each is loaded onto its own device in the serving
    dtype (``device_map`` of that device) before the next is read, not all on the host, then moved."""
    import serving.engine as engine_module
    from serving.config import ServeConfig
    from serving.engine import MixEngine

    loads = []
    real = engine_module.load_causal_lm

    def spy(path, *args, **kwargs):
        model = real(path, *args, **kwargs)
        loads.append((kwargs.get("device_map"), {(p.device.type, p.dtype) for p in model.parameters()}))
        return model

    monkeypatch.setattr(engine_module, "load_causal_lm", spy)
    engine = MixEngine(ServeConfig(policies=two_policies, dtype="bfloat16").validate())
    try:
        assert loads == [("cpu", {("cpu", torch.bfloat16)})] * len(two_policies)
    finally:
        engine.close()


def test_a_soup_batch_moves_to_the_per_row_soup_when_another_vector_joins(two_policies):
    """A soup batch starts on the merged model of its one vector; a row with another vector joining
    moves it, KV caches and all, to the per-row soup (whose layers give the same keys and values):
    the joining row decodes as its own merged model alone, the first row as its own throughout."""
    import copy

    from serving.api import Parsed
    from serving.decode import LockstepDecoder, Sampling
    from serving.engine import Request, SoupBatch
    from serving.rowsoup import RowSoup

    models = [load_causal_lm(p).eval() for p in two_policies.values()]

    def merged(w):
        model = copy.deepcopy(models[0])
        model.load_state_dict(soup_state_dicts([m.state_dict() for m in models], w))
        return model

    def request(prompt, w, n):
        return Request(Parsed(prompt, w, "soup", Sampling(max_tokens=n, temperature=0), [], False, False), print)

    a, b = (0.25, 0.75), (0.75, 0.25)
    first, joining = request([5, 9, 17, 33, 2, 8, 11], a, 10), request([7, 40, 3, 12, 6], b, 5)
    soup = SoupBatch(RowSoup(models), merged(a), decimals=2)
    decoder = LockstepDecoder(soup.models(), 0, [], on_rows=soup.on_rows)
    assert decoder.models[0] is soup.merged
    steps = []

    def more(n):
        steps.append(n)
        return [soup.row(joining)] if len(steps) == 3 else []

    got = decoder.generate([soup.row(first)], more=more)
    assert soup.merged is None and decoder.models == [soup.row_soup.model] and soup.vectors == [a, b]
    for req, w, tokens in zip((first, joining), (a, b), got):
        alone = LockstepDecoder([merged(w)], 0, []).generate([soup.row(req)])[0]
        assert tokens == alone
