import os
import shutil
import tempfile
import time

import pytest

from cluster import ray_jobs as jobs
from cluster.demo import run_demo
from tests.helpers import RayNode
from trainers.core.runtime import free_port


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`moray demo --tiny` once: its directory and table (the study test finishes the same directory)."""
    import contextlib
    import io

    import ray


    root = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            table = run_demo(tiny=True, out=str(root))
    finally:
        ray.shutdown()
    return {"dir": root, "table": table, "stdout": printed.getvalue()}


@pytest.fixture(scope="module")
def ray_head(request):
    """A Ray head on loopback (`ray start --head --block`, its own temp dir, free ports, metrics
    reported every second, ``HEAD_CPUS`` of the test module or 4), stopped with its process group."""
    temp = tempfile.mkdtemp(prefix="moray-head-", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard, metrics, gcs = free_port(), free_port(), free_port()
    head = RayNode(temp, "head", ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
                                  f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                                  f"--num-cpus={getattr(request.module, 'HEAD_CPUS', 4)}", f"--temp-dir={temp}"],
                   env=dict(os.environ, RAY_metrics_report_interval_ms="1000"))
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            head.check_alive()
            try:
                jobs.client(url)
                break
            except ConnectionError:
                assert time.time() < deadline, "the head's dashboard did not come up"
                time.sleep(1)
        yield {"url": url, "metrics": f"http://127.0.0.1:{metrics}/metrics", "temp": temp, "gcs": f"127.0.0.1:{gcs}"}
    finally:  # only this head's processes: its own process group
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)
