"""A conditioned policy through HTTP on a local Ray, from the Serve file `moray serve --policies OUT`
writes: /v1/objectives says it is conditioned, concurrent requests with their own vectors are each
answered as the model at their λ from one batch, bad input gets 400 and the server keeps serving
(slow: Ray Serve start-up)."""

import concurrent.futures

import pytest
import requests
import torch

from cluster.cli import main
from serving.deploy import load_serve_file, run_serve_file
from serving.policies import parse_policies
from serving.offline.soup import soup_policies
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.runtime import free_port

pytestmark = pytest.mark.slow

PROMPT = "Write about the coffee."


@pytest.fixture(scope="module")
def server(ray_local, conditioned, tmp_path_factory):
    from ray import serve

    path = str(tmp_path_factory.mktemp("serve") / "serve.yaml")
    assert main(["serve", "--policies", conditioned, "--port", str(free_port()), "--write-config", path,
                 "--set", "batch_wait_ms=200"]) == 0
    yield run_serve_file(load_serve_file(path))
    serve.shutdown()


def _post(url, body):
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def test_objectives_say_the_policy_is_conditioned(server):
    info = requests.get(f"{server}/v1/objectives", timeout=30).json()
    assert info["objectives"] == ["a", "b"] and info["policy"] == "conditioned"
    assert info["default_mixing"] == "soup" and info["soup_cache"]["per_row"] == "lora"


def test_rows_with_their_own_vectors_are_each_the_model_at_their_weights(server, conditioned, tmp_path):
    vectors = [(0.1, 0.9), (0.5, 0.5), (0.8, 0.2), (1.0, 0.0)]
    with concurrent.futures.ThreadPoolExecutor(len(vectors)) as pool:
        bodies = [{"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "objective_weights": {"a": a, "b": b}}
                  for a, b in vectors]
        answers = [r.json() for r in pool.map(lambda body: _post(server, body), bodies)]
    assert max(a["moray"]["batch_size"] for a in answers) > 1  # rows with different vectors shared a batch
    tok = load_tokenizer(conditioned)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    for w, answer in zip(vectors, answers):
        assert answer["moray"]["mixing"] == "soup"
        merged = load_causal_lm(soup_policies(parse_policies(conditioned), w, str(tmp_path / f"soup{w[0]}"))).eval()
        with torch.no_grad():
            out = merged.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        assert answer["choices"][0]["text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("body,param", [
    ({"prompt": PROMPT, "objective_weights": {"c": 1.0}}, "objective_weights"),
    ({"prompt": PROMPT, "objective_weights": {"a": -1.0, "b": 1.0}}, "objective_weights"),
    ({"prompt": PROMPT, "objective_weights": {"a": 0.0, "b": 0.0}}, "objective_weights"),
    ({"prompt": PROMPT, "objective_weights": {"a": 0.5}, "mixing": "average"}, "mixing"),
])
def test_bad_weights_get_400_and_the_server_keeps_serving(server, body, param):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = _post(server, {"prompt": PROMPT, "max_tokens": 4, "objective_weights": {"a": 0.3, "b": 0.7}})
    assert ok.status_code == 200, ok.text
