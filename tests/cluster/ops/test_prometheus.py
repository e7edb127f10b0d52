"""A real Prometheus, configured as the README's Monitoring section says (1 s scrapes), scrapes a
loopback Ray head while four short jobs train (GAPO, online GAPO, MOPO, WRPO: every training metric)
and `moray serve` answers requests in each mixing mode: every expression of the Grafana dashboard
has data over the run. Slow; skipped where no `prometheus` is installed."""

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import pytest
import requests

from cluster.cli import main
from cluster.ops import ray_jobs as jobs
from cluster.ops.metrics import grafana_dashboard
from serving.mixing import MIXING_MODES
from tests.helpers import candidates, make_policy, multi_rows, synthetic_pairs, wait_for, write_jsonl
from trainers.core.runtime import free_port

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS = shutil.which("prometheus")
HEAD_CPUS = 8  # logical: four one-worker jobs and a serving replica at once
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    PROMETHEUS is None, reason="no `prometheus` on PATH (Debian's package: apt-get install prometheus)")]


def readme_monitoring():
    """The README's prometheus.yml and the command line that runs Prometheus on it."""
    text = (ROOT / "README.md").read_text()
    config = re.search(r"^cat > prometheus\.yml <<'EOF'\n(.*?)^EOF$", text, re.S | re.M).group(1)
    command = re.search(r"^(prometheus --config\.file=prometheus\.yml .*?) &$", text, re.M).group(1)
    return config, command


def start_prometheus(ray_temp: str, tmp: Path) -> Tuple[subprocess.Popen, str]:
    config, command = readme_monitoring()
    assert "/tmp/ray/prom_metrics_service_discovery.json" in config and "scrape_interval: 10s" in config
    (tmp / "prometheus.yml").write_text(config.replace("/tmp/ray/", ray_temp + "/")
                                        .replace("scrape_interval: 10s", "scrape_interval: 1s"))
    port = free_port()
    args = [a.replace("127.0.0.1:9090", f"127.0.0.1:{port}").replace("/tmp/moray-prometheus", str(tmp / "tsdb"))
            for a in shlex.split(command)]
    assert args[0] == "prometheus" and f"--web.listen-address=127.0.0.1:{port}" in args
    with open(tmp / "prometheus.log", "w") as log:
        proc = subprocess.Popen([PROMETHEUS] + args[1:], cwd=tmp, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop a process this test started, with its own process group (and nothing else)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(120)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def targets_up(prom: str) -> bool:
    try:
        active = requests.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    except (requests.ConnectionError, KeyError, ValueError):
        return False
    return bool(active) and all(t["health"] == "up" for t in active)


def has_data(prom: str, expr: str, start: float, end: float) -> bool:
    """Whether ``expr`` has a value (not NaN) at some 1 s step of ``[start, end]``."""
    r = requests.get(f"{prom}/api/v1/query_range", timeout=30,
                     params={"query": expr, "start": start, "end": end, "step": "1s"})
    assert r.status_code == 200, (expr, r.text)
    return any(not math.isnan(float(v)) for s in r.json()["data"]["result"] for _, v in s["values"])


def training_jobs(tiny_model: str, tmp: Path):
    """Four short one-worker jobs that between them set every training metric."""
    wrpo = [{**r, "source": "Truly wonderful work."} for r in synthetic_pairs(8)]
    common = ["--model", tiny_model, "--workers", "1", "--set", "train.checkpoint_every=0", "--set", "train.log_every=1"]
    return {
        "gapo": ["train", "gapo", "--objectives", "sentiment,conciseness", "--micro-batch-size", "4",
                 "--data", write_jsonl(tmp / "multi.jsonl", multi_rows(16)), "--out", str(tmp / "gapo")],
        "online": ["train", "gapo", "--online", "--objectives", "sentiment,conciseness", "--data", "demo:4",
                   "--samples-per-prompt", "2", "--max-new-tokens", "4", "--micro-batch-size", "2",
                   "--out", str(tmp / "online")],
        "mopo": ["train", "mopo", "--objective", "conciseness", "--constraints", "sentiment=0.5", "--accept-unmet",
                 "--data", write_jsonl(tmp / "cands.jsonl", candidates(8)), "--micro-batch-size", "2",
                 "--out", str(tmp / "mopo")],
        "wrpo": ["train", "wrpo", "--objective", "conciseness", "--data", write_jsonl(tmp / "wrpo.jsonl", wrpo),
                 "--micro-batch-size", "2", "--out", str(tmp / "wrpo")],
    }, common


def test_every_panel_has_data_over_a_short_run(ray_head, tiny_model, tmp_path, capsys):
    discovery = Path(ray_head["temp"]) / "prom_metrics_service_discovery.json"
    assert wait_for(discovery.exists, 120), "Ray wrote no service-discovery file"
    prometheus, prom = start_prometheus(ray_head["temp"], tmp_path)
    serve = None
    try:
        assert wait_for(lambda: targets_up(prom), 120), (tmp_path / "prometheus.log").read_text()[-3000:]
        start = time.time()

        policies = ",".join(f"{o}={make_policy(tiny_model, tmp_path / o, seed, objective=o)}"
                            for seed, o in enumerate(("sentiment", "conciseness"), 1))
        port = free_port()
        with open(tmp_path / "serve.log", "w") as log:
            serve = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moray"), "serve", "--address",
                                      ray_head["gcs"], "--policies", policies, "--port", str(port),
                                      "--set", "num_cpus=0.5"],
                                     start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        train, common = training_jobs(tiny_model, tmp_path)
        ids = {}
        for name, command in train.items():
            assert main(["submit", "--address", ray_head["url"], "--env", "DS_ACCELERATOR=cpu",
                         "--env", "OMP_NUM_THREADS=1", "--", "moray"] + command + common) == 0
            ids[name] = re.search(r"submitted (\S+):", capsys.readouterr().out).group(1)

        assert wait_for(lambda: "serving at" in (tmp_path / "serve.log").read_text() or serve.poll() is not None,
                        600), "moray serve did not start"
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        for wave in range(2):  # two waves a few scrapes apart: the counters' rates need an increase
            for mixing in MIXING_MODES:
                r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                                  json={"prompt": "Describe a park.", "max_tokens": 4, "mixing": mixing,
                                        "objective_weights": {"sentiment": 0.3, "conciseness": 0.7}})
                assert r.status_code == 200, r.text
            time.sleep(5)

        client = jobs.client(ray_head["url"])
        assert wait_for(lambda: all(str(client.get_job_status(i).value) in jobs.TERMINAL for i in ids.values()), 900)
        for name, job_id in ids.items():
            assert str(client.get_job_status(job_id).value) == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
        time.sleep(3)  # the last reports reach a scrape
        end = time.time()

        assert not has_data(prom, "ray_moray_train_no_such_metric", start, end)

        # the jobs ended: `moray metrics` still prints each one's last values (from Ray's KV store)
        import ray

        try:
            assert main(["metrics", "--address", ray_head["gcs"]]) == 0
        finally:
            ray.shutdown()
        finished = {(m.group(1), m.group(2)) for m in re.finditer(
            r"^ray_moray_train_(\w+)\{method=([\w-]+),.*  # last value of a finished job$", capsys.readouterr().out, re.M)}
        assert {("step", "gapo"), ("gapo_grad_cosine", "gapo"), ("mopo_lambda", "mopo"), ("wrpo_alpha", "wrpo"),
                ("online_kl", "online-gapo")} <= finished, finished
        missing = [(p["title"], t["expr"]) for p in grafana_dashboard()["panels"] for t in p["targets"]
                   if not has_data(prom, t["expr"].replace("$run", ".*"), start, end)]
        assert not missing, json.dumps(missing, indent=1)
    finally:
        if serve is not None:
            stop_group(serve)
        stop_group(prometheus)
