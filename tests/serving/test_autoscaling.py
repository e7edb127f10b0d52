"""Autoscaling shown, not only configured: a burst of requests takes the deployment from 1 replica
to 2, idle brings it back to 1, and every request of the burst is answered (slow: Ray Serve)."""

import threading

import pytest
import requests

from serving.config import ServeConfig
from serving.deploy import run_serve_file, serve_file
from tests.helpers import running_replicas, wait_for
from trainers.core.config import load_config
from trainers.core.runtime import free_port, init_ray

pytestmark = pytest.mark.slow

# the replicas' and the proxy's load reports every half second instead of every 10 s
FAST_METRICS = ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S")


@pytest.fixture(scope="module")
def autoscaled(two_policies):
    import ray
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        for name in FAST_METRICS:
            env.setenv(name, "0.5")
        init_ray(num_cpus=2)
        cfg = load_config(ServeConfig, overrides={
            "policies": two_policies, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2, "num_cpus": 0.5,
            "max_tokens_limit": 64, "max_batch_size": 2})
        url = run_serve_file(serve_file(cfg, port=free_port()))
        yield url
        serve.shutdown()
        ray.shutdown()


def test_a_burst_scales_out_to_two_replicas_and_idle_back_to_one(autoscaled):
    url = autoscaled
    assert running_replicas() == 1
    stop, codes, lock = threading.Event(), [], threading.Lock()

    def client():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/completions", json={"prompt": "Write about the coffee.", "max_tokens": 24,
                                                             "ignore_eos": True, "temperature": 0}, timeout=300)
            with lock:
                codes.append(r.status_code)

    clients = [threading.Thread(target=client) for _ in range(6)]
    for c in clients:
        c.start()
    try:
        scaled_out = wait_for(lambda: running_replicas() == 2, 180)
        if scaled_out:  # the new replica takes part: a few more requests after it is up
            done = len(codes)
            wait_for(lambda: len(codes) >= done + 6, 120)
    finally:
        stop.set()
        for c in clients:
            c.join(300)
    assert scaled_out, "the burst never brought a second replica up"
    assert codes and set(codes) == {200}, f"answers during the burst: {sorted(set(codes))}"
    assert wait_for(lambda: running_replicas() == 1, 180), "idle never brought the deployment back to one replica"
    r = requests.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=120)
    assert r.status_code == 200
