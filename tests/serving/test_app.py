"""The Serve app through HTTP on a local Ray, started from a Serve config file as `moray serve
--config` does: unit weights give each policy's own greedy output in both mixing modes, streaming
equals the whole answer, every bad input gets a 400 and the next request still succeeds, and the
OpenAI client works with `extra_body` (slow: Ray Serve start-up)."""

import json

import pytest
import requests
import torch

from cluster.ops.metrics import node_metrics_urls, read_metrics, total
from serving.config import ServeConfig
from serving.deploy import load_serve_file, run_serve_file, serve_file, write_serve_file
from serving.metrics import SERVE
from trainers.core.config import load_config
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.runtime import free_port

pytestmark = pytest.mark.slow

PROMPT = "Write about the coffee."


@pytest.fixture(scope="module")
def server(ray_local, two_policies, tmp_path_factory):
    from ray import serve

    mpo = tmp_path_factory.mktemp("mpo") / "weights.json"
    mpo.write_text(json.dumps({"weights": {"sentiment": 0.25, "conciseness": 0.75}}))
    cfg = load_config(ServeConfig, overrides={"policies": two_policies, "mpo_weights": str(mpo),
                                              "max_tokens_limit": 48, "default_max_tokens": 16,
                                              "batch_wait_ms": 50})
    path = write_serve_file(serve_file(cfg, port=free_port()), str(tmp_path_factory.mktemp("serve") / "serve.yaml"))
    url = run_serve_file(load_serve_file(path))
    yield url
    serve.shutdown()


def _post(url, body, chat=False):
    return requests.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body, timeout=120)


def _greedy_text(policy_dir, prompt, n):
    tok = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_objectives_and_health(server):
    info = requests.get(f"{server}/v1/objectives", timeout=30).json()
    assert info["objectives"] == ["sentiment", "conciseness"]
    assert info["default_weights"] == {"sentiment": 0.25, "conciseness": 0.75} and info["default_source"] == "mpo"
    assert info["mixing"] == ["logits", "soup"]
    assert info["soup_cache"]["per_row"] == "full"  # full-weight policies: no adapters to batch over
    assert requests.get(f"{server}/healthz", timeout=30).json()["engine_alive"] is True


@pytest.mark.parametrize("mixing", ["logits", "soup"])
def test_unit_weights_give_each_policy_greedy_output(server, two_policies, mixing):
    for name, path in two_policies.items():
        r = _post(server, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "mixing": mixing,
                           "objective_weights": {name: 1.0}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == _greedy_text(path, PROMPT, 20)
        assert body["moray"]["mixing"] == mixing and body["moray"]["objective_weights"][name] == 1.0
        assert body["usage"]["completion_tokens"] <= 20


def test_mixed_weights_in_both_modes_streaming_and_not(server):
    for mixing in ("logits", "soup"):
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.8, "seed": 7, "mixing": mixing,
                "objective_weights": {"sentiment": 0.3, "conciseness": 0.7}}
        whole = _post(server, body).json()
        assert whole["moray"]["objective_weights"] == pytest.approx({"sentiment": 0.3, "conciseness": 0.7})
        r = requests.post(f"{server}/v1/completions", json=dict(body, stream=True), stream=True, timeout=120)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # the soup for (0.3, 0.7) was merged once and then found in the cache
    assert requests.get(f"{server}/v1/objectives", timeout=30).json()["soup_cache"]["hits"] >= 1


def test_stop_string_cuts_the_answer(server):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = _post(server, body).json()["choices"][0]["text"]
    stop = full[6:9]
    assert len(stop) == 3
    cut = _post(server, dict(body, stop=[stop, "never-there"])).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"


def test_chat_completion_streams_role_then_content(server):
    messages = [{"role": "user", "content": "Tell me about the park."}]
    whole = _post(server, {"messages": messages, "max_tokens": 12, "temperature": 0}, chat=True).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    r = requests.post(f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": 12,
                                                             "temperature": 0, "stream": True}, stream=True, timeout=120)
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize("raw, param", [
    ({"prompt": PROMPT, "objective_weights": {"helpfulness": 1}}, "objective_weights"),
    ({"prompt": PROMPT, "objective_weights": {"sentiment": -0.5, "conciseness": 1}}, "objective_weights"),
    ('{"prompt": "x", "objective_weights": {"sentiment": NaN}}', "objective_weights"),
    ({"prompt": PROMPT, "objective_weights": {"sentiment": 0, "conciseness": 0}}, "objective_weights"),
    ({"prompt": PROMPT, "objective_weights": [1, 0, 0]}, "objective_weights"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ({"prompt": PROMPT, "max_tokens": 49}, "max_tokens"),
    ({"prompt": "coffee " * 600}, "prompt"),
    ({"prompt": PROMPT, "mixing": "median"}, "mixing"),
    ('{"prompt": ', None),
    ('{"prompt": "x", "objective_weights": {"sentiment": 1e400}}', "objective_weights"),
    ('{"prompt": "x", "objective_weights": {"sentiment": 1' + "0" * 400 + '}}', "objective_weights"),
])
def test_bad_input_gets_400_and_the_server_keeps_serving(server, raw, param):
    data = raw if isinstance(raw, str) else json.dumps(raw)
    r = requests.post(f"{server}/v1/completions", data=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    ok = _post(server, {"prompt": PROMPT, "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("mixing", ["logits", "soup"])
def test_huge_weights_are_served_as_their_mix(server, mixing):
    """Weights near the float limit (their sum overflows) mix as their ratio: 1e308 each is 0.5/0.5."""
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "mixing": mixing, "ignore_eos": True}
    half = _post(server, dict(body, objective_weights={"sentiment": 0.5, "conciseness": 0.5}))
    huge = _post(server, dict(body, objective_weights={"sentiment": 1e308, "conciseness": 1e308}))
    assert huge.status_code == 200, huge.text
    assert huge.json()["moray"]["objective_weights"] == {"sentiment": 0.5, "conciseness": 0.5}
    assert huge.json()["choices"][0]["text"] == half.json()["choices"][0]["text"]


def test_concurrent_logits_requests_share_a_batch_and_match_alone(server):
    from concurrent.futures import ThreadPoolExecutor

    weights = [{"sentiment": w, "conciseness": 1 - w} for w in (0.0, 0.2, 0.5, 0.8, 1.0, 0.35)]
    bodies = [{"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "objective_weights": w} for w in weights]
    alone = [_post(server, b).json()["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _post(server, b).json(), bodies))
    assert [t["choices"][0]["text"] for t in together] == alone
    assert max(t["moray"]["batch_size"] for t in together) > 1


def test_openai_client_with_extra_body(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    c = client.completions.create(model="moray-mix", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"objective_weights": {"conciseness": 1.0}, "mixing": "soup"})
    assert c.choices[0].text == _post(server, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                               "objective_weights": {"conciseness": 1}}).json()["choices"][0]["text"]
    chat = client.chat.completions.create(model="moray-mix", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, extra_body={"objective_weights": {"sentiment": 2, "conciseness": 1}})
    assert chat.choices[0].message.role == "assistant"
    assert chat.model_extra["moray"]["objective_weights"]["sentiment"] == pytest.approx(2 / 3)
    stream = client.completions.create(model="moray-mix", prompt=PROMPT, max_tokens=6, stream=True, seed=1)
    assert len(list(stream)) >= 1
    with pytest.raises(openai.BadRequestError, match="unknown objective"):
        client.completions.create(model="moray-mix", prompt=PROMPT, extra_body={"objective_weights": {"x": 1}})


def test_requests_reach_the_metrics_endpoint(server):
    """Two soup requests and one bad one move Moray's serving metrics, as the node's Prometheus
    endpoint exports them, by exactly their counts, tokens and weights."""
    import time


    url = node_metrics_urls()[0]
    where = {"route": "completions", "mixing": "soup"}

    def counts():
        s = read_metrics(url)
        return {"ok": total(s, "ray_moray_serve_requests_total", status="200", **where),
                "bad": total(s, "ray_moray_serve_requests_total", route="completions", status="400"),
                "latency": total(s, "ray_moray_serve_latency_seconds_count", **where),
                "first_token": total(s, "ray_moray_serve_first_token_seconds_count", **where),
                "tokens": total(s, "ray_moray_serve_generated_tokens_total", mixing="soup"),
                "weights": total(s, "ray_moray_serve_objective_weight_count", objective="conciseness"),
                # Ray exports a histogram's sum from bucket midpoints: count the buckets instead
                "weight_le_0.7": total(s, "ray_moray_serve_objective_weight_bucket", objective="conciseness", le="0.7"),
                "weight_le_0.8": total(s, "ray_moray_serve_objective_weight_bucket", objective="conciseness", le="0.8"),
                "soup_batches": total(s, "ray_moray_serve_soup_cache_total"),
                "batches": total(s, "ray_moray_serve_batch_size_count", mixing="soup")}, {n for n, _, _ in s}

    def settled(deadline):  # earlier tests' requests: wait until nothing moves for two export intervals
        last = counts()[0]
        while True:
            time.sleep(2.5)
            now = counts()[0]
            if now == last or time.time() > deadline:
                return now
            last = now

    before = settled(time.time() + 30)
    tokens = 0
    for seed in (1, 2):
        r = _post(server, {"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "temperature": 0.8, "seed": seed,
                           "mixing": "soup", "objective_weights": {"sentiment": 0.25, "conciseness": 0.75}})
        assert r.status_code == 200, r.text
        tokens += r.json()["usage"]["completion_tokens"]
    assert tokens == 10
    assert _post(server, {"prompt": PROMPT, "objective_weights": {"sentiment": -1, "conciseness": 1}}).status_code == 400
    expected = {"ok": 2, "bad": 1, "latency": 2, "first_token": 2, "tokens": tokens, "weights": 2, "weight_le_0.7": 0, "weight_le_0.8": 2,
                "soup_batches": 2, "batches": 2}
    deadline = time.time() + 30
    while True:
        after, names = counts()
        moved = {k: round(after[k] - before[k], 6) for k in expected}
        if moved == expected or time.time() > deadline:
            break
        time.sleep(1)
    assert moved == expected
    suffix = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    assert {f"ray_{s.name}{x}" for s in SERVE.values() for x in suffix[s.kind]} <= names


def test_serve_file_is_a_valid_ray_serve_config(two_policies, tmp_path):
    cfg = load_config(ServeConfig, overrides={"policies": two_policies, "max_replicas": 3})
    doc = load_serve_file(write_serve_file(serve_file(cfg), str(tmp_path / "s.yaml")))
    dep = doc["applications"][0]["deployments"][0]
    assert dep["autoscaling_config"]["max_replicas"] == 3 and doc["http_options"]["host"] == "127.0.0.1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n- name: x\n  import_path: serving.app:build_app\n  deployments:\n  - num_replicas: 2\n")
    with pytest.raises(ValueError, match="not a valid Ray Serve config"):
        load_serve_file(str(bad))
