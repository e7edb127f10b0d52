import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.ops import ray_jobs as jobs
from tests.helpers import RayNode
from trainers.core.runtime import free_port


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`moray demo --tiny` once, as a user runs it with its output going to a file (the study test
    finishes the same directory): its directory, table (results.json) and the whole console log,
    Ray's forwarded worker output included."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    log = root.parent / "demo.log"
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--tiny", "--out", str(root)],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=repo, env=env,
                              timeout=3600)
    text = log.read_bytes().decode("utf-8", errors="replace")
    assert done.returncode == 0, text[-4000:]
    return {"dir": root, "table": json.loads((root / "results.json").read_text()), "stdout": text}


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
