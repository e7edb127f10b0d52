"""`moray serve` as a user runs it: it answers, and a supervisor's SIGTERM stops it cleanly."""

import os
import signal
import subprocess
import sys

import requests

from tests.helpers import make_policy, wait_for
from trainers.core.runtime import free_port


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_moray_serve_answers_then_stops_on_sigterm_with_its_ray(tiny_model, tmp_path):
    a = make_policy(tiny_model, tmp_path / "sentiment", 1, objective="sentiment")
    b = make_policy(tiny_model, tmp_path / "conciseness", 2, objective="conciseness")
    port, log_path = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moray"), "serve", "--policies",
                                 f"sentiment={a},conciseness={b}", "--port", str(port), "--set", "num_cpus=0.5"],
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_for(lambda: "serving at" in log_path.read_text() or proc.poll() is not None, 240), "no start"
        assert proc.poll() is None, log_path.read_text()[-3000:]
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "Describe a park.", "max_tokens": 4, "mixing": "soup",
                                "objective_weights": {"sentiment": 0.3, "conciseness": 0.7}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()[-3000:]
        out = log_path.read_text()
        assert "stopping: requests in flight" in out and "SIGTERM received" not in out
        # its embedded Ray (GCS, raylet, workers) went with it
        assert wait_for(lambda: not _group_alive(proc.pid), 60)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
