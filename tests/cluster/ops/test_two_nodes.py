"""A two-node Ray cluster on loopback (a head and a second node, each ``ray start --block`` in its
own process group, each with 2 logical CPUs beyond the head's spare 2): a 2-worker DPO job
submitted with ``moray submit`` puts one worker on each node; the same job with the second node
killed after a checkpoint resumes on the head alone and ends with the uninterrupted run's weights
(1e-6). Checkpoints and exports go to ``file://`` URIs that both nodes see."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from cluster.cli import main
from cluster.ops import ray_jobs as jobs
from tests.helpers import RayNode, assert_only_policy_files, synthetic_pairs, wait_for, write_jsonl
from trainers.core.export import load_state
from trainers.core.runtime import free_port

pytestmark = pytest.mark.slow

# 48 pairs, 2 workers, micro-batch 2, 3 epochs -> 12 steps per epoch, 36 in all; a checkpoint every 2
N_PAIRS, STEPS = 48, 36


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="moray-2n-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard = free_port(), free_port()
    # a lost node is declared dead within seconds, not the default half minute; `ray start --address`
    # refuses to join a second node on one machine unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
    head = RayNode(temp, "head", ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                                  "--num-cpus=4", f"--temp-dir={temp}"], env)
    nodes = [head]
    url = f"http://127.0.0.1:{dashboard}"
    try:
        assert wait_for(lambda: _alive_nodes(url, head) >= 1, 180), "the head did not come up"
        second = RayNode(temp, "second", [f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                          f"--dashboard-agent-listen-port={free_port()}",
                                          f"--metrics-export-port={free_port()}"], env)
        nodes.append(second)
        assert wait_for(lambda: _alive_nodes(url, head, second) == 2, 180), "the second node did not join"
        yield {"url": url, "head": head, "second": second}
    finally:  # only the processes these nodes started: their own process groups
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _state(url, *args):
    """``ray list ...`` against the cluster, in its own process: Ray reads the token auth mode once
    per process, and this one may have read it before the cluster existed."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "list", *args, "--address", url,
                           "--format", "json", "--limit", "1000"], capture_output=True, text=True, env=env, timeout=120)
    start = done.stdout.find("[")
    return json.loads(done.stdout[start:]) if done.returncode == 0 and start >= 0 else None


def _alive_nodes(url, *nodes):
    for node in nodes:
        node.check_alive()
    listed = _state(url, "nodes", "--filter", "state=ALIVE")
    return len(listed) if listed else 0


def _submit(url, data, model, out, storage, capsys):
    cmd = ["train", "dpo", "--objective", "sentiment", "--data", data, "--model", model, "--out", out,
           "--workers", "2", "--epochs", "3", "--micro-batch-size", "2",
           "--set", "train.cpus_per_worker=2", "--set", "train.placement_strategy=SPREAD",
           "--set", "train.checkpoint_every=2", "--set", "train.max_failures=1", "--set", "train.lr=1e-3",
           "--set", f"train.storage_path={storage}"]
    assert main(["submit", "--address", url, "--env", "DS_ACCELERATOR=cpu", "--", "moray"] + cmd) == 0
    return re.search(r"submitted (\S+): moray train dpo", capsys.readouterr().out).group(1)


def _worker_nodes(url, job_id):
    """The nodes of the Ray Train workers of a submitted job's driver."""
    ray_job = jobs.client(url).get_job_info(job_id).job_id
    actors = _state(url, "actors", "--filter", "class_name=RayTrainWorker", "--detail")
    return [a["node_id"] for a in actors if a["job_id"] == ray_job]


def test_two_nodes_one_worker_each_and_a_lost_node_resumes_exactly(cluster, tiny_model, tmp_path, capsys):
    url, client = cluster["url"], jobs.client(cluster["url"])
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(N_PAIRS, seed=4))
    shared = f"file://{tmp_path}"

    # uninterrupted, submitted with `moray submit`: one worker per node
    clean = _submit(url, data, tiny_model, f"{shared}/clean", f"{shared}/storage", capsys)
    status = jobs.follow(clean, url)
    assert status == "SUCCEEDED", client.get_job_logs(clean)[-4000:]
    nodes = _worker_nodes(url, clean)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert_only_policy_files(tmp_path / "clean")

    # the same job; the second node dies once the first checkpoint is in storage
    lost = _submit(url, data, tiny_model, f"{shared}/resumed", f"{shared}/storage-resumed", capsys)
    checkpoints = lambda: list((tmp_path / "storage-resumed").glob("dpo-sentiment-*/step_*"))  # noqa: E731
    assert wait_for(checkpoints, 300), "no checkpoint appeared"
    assert str(client.get_job_status(lost).value) == "RUNNING", "the job ended before the node was lost"
    cluster["second"].kill()
    status = jobs.follow(lost, url)
    logs = client.get_job_logs(lost)
    assert status == "SUCCEEDED", logs[-4000:]
    assert re.search(rf"resuming from the checkpoint at optimizer step \d+ of {STEPS}", logs), logs[-4000:]
    a, b = load_state(str(tmp_path / "clean")), load_state(str(tmp_path / "resumed"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"the run that lost a node differs from the uninterrupted one by {worst}"
