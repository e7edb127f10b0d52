"""A replica killed under load: requests keep being answered, only those in flight on the dead
replica may fail (with a 5xx, never a hang), Serve brings a new replica up, and every request after
that is answered 200 (slow: Ray Serve, two replicas)."""

import threading
import time

import pytest
import requests

from serving.config import ServeConfig
from serving.deploy import DEPLOYMENT, run_serve_file, serve_file
from tests.helpers import running_replicas, wait_for
from trainers.core.config import load_config
from trainers.core.runtime import free_port, init_ray

pytestmark = pytest.mark.slow

CLIENTS = 4


@pytest.fixture(scope="module")
def two_replicas(two_policies):
    import ray
    from ray import serve

    init_ray(num_cpus=2)
    cfg = load_config(ServeConfig, overrides={
        "policies": two_policies, "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5,
        "max_tokens_limit": 64, "max_batch_size": 2})
    yield run_serve_file(serve_file(cfg, port=free_port()))
    serve.shutdown()
    ray.shutdown()


def _replicas():
    """Names of this deployment's live replica actors."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT}#" in a["name"]}


def test_a_killed_replica_is_replaced_and_the_endpoint_keeps_answering(two_replicas):
    import ray

    url = two_replicas
    assert wait_for(lambda: running_replicas() == 2, 120)
    before = _replicas()
    assert len(before) == 2, before
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def client():
        while not stop.is_set():
            sent = time.time()
            r = requests.post(f"{url}/v1/completions", json={"prompt": "Write about the park.", "max_tokens": 16,
                                                             "ignore_eos": True, "temperature": 0}, timeout=300)
            with lock:
                answers.append((sent, r.status_code))

    clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    try:
        assert wait_for(lambda: len(answers) >= 8, 180), "no traffic before the kill"
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.time()
        replaced = wait_for(lambda: running_replicas() == 2 and len(_replicas() - before) == 1, 180)
        recovered_at = time.time()
        wait_for(lambda: sum(s > recovered_at for s, _ in answers) >= 12, 180)
    finally:
        stop.set()
        for c in clients:
            c.join(300)
    assert replaced, f"no replica replaced {victim}: {_replicas()}"
    assert not any(c.is_alive() for c in clients), "a request hung"
    failed = [code for _, code in answers if code != 200]
    assert len(failed) <= CLIENTS and all(500 <= code < 600 for code in failed), failed  # only those in flight
    after = [code for sent, code in answers if sent > recovered_at]
    assert len(after) >= 12 and set(after) == {200}, after
    assert sum(1 for sent, code in answers if killed_at < sent and code == 200) >= 12
