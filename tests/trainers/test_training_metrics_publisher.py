"""The training publisher on a real Ray (report interval 1 s, set in conftest): its gauges stay on
the node's metrics endpoint however long a step takes, and a finished job's last values stay
readable (``moray metrics``) after its gauges are gone."""

import time

import pytest

from cluster.cli.commands import metrics_lines
from cluster.ops.metrics import final_samples, node_metrics_urls, read_metrics
from tests.helpers import wait_for
from trainers.training_metrics import TrainingMetrics


@pytest.fixture(scope="module")
def publisher(ray_local):
    import ray

    # an actor, as a Ray Train worker is: its own core worker exports its metrics
    actor = ray.remote(num_cpus=0)(TrainingMetrics).remote("slow-run", "dpo", "sentiment")
    yield actor
    ray.kill(actor)


def _loss(url):
    return [v for n, lab, v in read_metrics(url) if n == "ray_moray_train_loss" and lab.get("run") == "slow-run"]


def test_gauges_stay_between_slow_steps_and_the_last_values_outlive_the_job(publisher):
    import ray

    url = node_metrics_urls()[0]
    ray.get(publisher.record.remote({"loss": 0.75, "step": 1, "step_rows": 4.0}))
    assert wait_for(lambda: _loss(url) == [0.75], 30), read_metrics(url)
    # a step that takes four report intervals (Ray's agent drops a gauge two intervals after its last report)
    seen = []
    for _ in range(16):
        time.sleep(0.5)
        seen.append(_loss(url))
    assert all(v == [0.75] for v in seen), seen
    ray.get(publisher.record.remote({"loss": 0.5, "step": 2, "step_rows": 4.0}))
    assert wait_for(lambda: _loss(url) == [0.5], 30), read_metrics(url)

    # the job ends: the gauges stop being re-reported and leave the endpoint; the last values stay readable
    ray.get(publisher.close.remote({"loss": 0.5, "step": 2, "rows_trained": 8}))
    assert wait_for(lambda: _loss(url) == [], 30), read_metrics(url)
    final = {(n, lab["objective"]): v for n, lab, v in final_samples() if lab["run"] == "slow-run"}
    assert final == {("ray_moray_train_loss", "sentiment"): 0.5, ("ray_moray_train_step", "sentiment"): 2.0}
    assert "ray_moray_train_loss{method=dpo,objective=sentiment,run=slow-run} 0.5  # last value of a finished job" \
        in metrics_lines()
