"""`moray submit` / `moray jobs` against a Ray head this module starts on loopback (`ray start
--head --block` in its own process group, stopped by signalling that group alone): two
per-objective DPO jobs run side by side, their training metrics are read from the head's
Prometheus endpoint while they run, and a third job is stopped."""

import json
import os
import re
import threading
import time

import pytest

from cluster.cli import main
from cluster.ops import ray_jobs as jobs
from cluster.ops.metrics import read_metrics
from trainers.core.runtime import free_port
from trainers.training_metrics import TRAIN_ROWS, TRAIN_SCALARS


def test_runtime_env(tmp_path):
    env = jobs.runtime_env(str(tmp_path), ["numpy", "pyyaml"], ["DS_ACCELERATOR=cpu", "EMPTY="])
    assert env == {"working_dir": str(tmp_path), "pip": ["numpy", "pyyaml"],
                   "env_vars": {"DS_ACCELERATOR": "cpu", "EMPTY": ""}}
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n")
    assert jobs.runtime_env(pip=[str(req)]) == {"pip": str(req)}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        jobs.runtime_env(env=["NOVALUE"])
    with pytest.raises(FileNotFoundError):
        jobs.runtime_env(str(tmp_path / "missing"))


def test_unreachable_cluster_is_a_clear_error(capsys):
    port = free_port()
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "Failed to connect" in capsys.readouterr().err


def test_the_cli_imports_no_ray_so_jobs_can_turn_token_auth_on():
    """Importing ray fixes its config (the auth mode among it) for the process: `moray jobs` sets
    RAY_AUTH_MODE=token before its first ray import, so nothing the CLI imports may import ray."""
    import subprocess
    import sys

    code = "import sys, cluster.cli; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "[]"


class Scraper(threading.Thread):
    """Reads the endpoint every half second; keeps each series' largest value."""
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.seen, self.done = url, {}, threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                for name, labels, value in read_metrics(self.url):
                    key = (name, labels.get("run", ""), labels.get("method", ""), labels.get("objective", ""))
                    self.seen[key] = max(value, self.seen.get(key, float("-inf")))
            except Exception:  # not up yet
                pass
            self.done.wait(0.5)

    def largest(self, name: str, objective: str):
        values = [(run, method, v) for (n, run, method, o), v in self.seen.items() if n == name and o == objective]
        assert len(values) == 1, (name, objective, values)
        return values[0]


@pytest.mark.slow
def test_per_objective_jobs_side_by_side_with_metrics(ray_head, tiny_model, pairs_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    url = ray_head["url"]
    scraper = Scraper(ray_head["metrics"])
    scraper.start()

    def train(objective):
        return ["train", "dpo", "--objective", objective, "--data", pairs_file, "--model", tiny_model,
                "--out", str(tmp_path / objective), "--workers", "1", "--epochs", "3", "--micro-batch-size", "4",
                "--set", "train.checkpoint_every=0"]

    ids = {}
    for objective in ("sentiment", "conciseness"):
        assert main(["submit", "--address", url, "--env", "DS_ACCELERATOR=cpu", "--env", "OMP_NUM_THREADS=1",
                     "--", "moray"] + train(objective)) == 0
        out = capsys.readouterr().out
        ids[objective] = re.search(r"submitted (\S+): moray train dpo", out).group(1)
        assert f"dashboard: {url}/#/jobs/{ids[objective]}" in out

    client = jobs.client(url)
    both_running, deadline = False, time.time() + 600
    while True:
        status = {o: str(client.get_job_status(i).value) for o, i in ids.items()}
        both_running |= all(s == "RUNNING" for s in status.values())
        if all(s in jobs.TERMINAL for s in status.values()):
            break
        assert time.time() < deadline, status
        time.sleep(0.5)
    time.sleep(2)
    scraper.done.set()
    scraper.join()
    for objective, job_id in ids.items():
        assert status[objective] == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    assert both_running, "the two jobs never ran at the same time"

    # the CLI's views of them
    assert main(["jobs", "list", "--address", url]) == 0
    listed = capsys.readouterr().out
    assert all(re.search(rf"{i}\s+SUCCEEDED", listed) for i in ids.values()), listed
    assert "train dpo --objective sentiment" in listed
    assert client.get_job_info(ids["sentiment"]).runtime_env["env_vars"] == {"DS_ACCELERATOR": "cpu",
                                                                             "OMP_NUM_THREADS": "1"}
    assert main(["jobs", "status", ids["sentiment"], "--address", url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert main(["jobs", "logs", ids["conciseness"], "--address", url]) == 0
    assert "trained a DPO policy for 'conciseness' on 48 pairs" in capsys.readouterr().out
    assert main(["jobs", "logs", ids["sentiment"], "--follow", "--address", url]) == 0  # ended: returns at once
    assert "trained a DPO policy for 'sentiment' on 48 pairs" in capsys.readouterr().out

    # each job's export, and its metrics as the head exported them while it ran: 48 pairs x 3 epochs
    # in micro-batches of 4 on one worker is 36 optimizer steps and 144 pairs
    for objective in ids:
        meta = json.loads((tmp_path / objective / "moray.json").read_text())
        assert meta["objective"] == objective and meta["workers"] == 1
        AutoModelForCausalLM.from_pretrained(str(tmp_path / objective))
        run, method, steps = scraper.largest("ray_" + TRAIN_SCALARS["step"].name, objective)
        assert run.startswith(f"dpo-{objective}-") and method == "dpo" and steps == 36
        assert scraper.largest(f"ray_{TRAIN_ROWS.name}_total", objective)[2] == 144
        for key in ("loss", "reward_margin", "accuracy", "rows_per_s", "tokens_per_s", "lr"):
            assert scraper.largest("ray_" + TRAIN_SCALARS[key].name, objective)[0] == run
        assert 0 < scraper.largest("ray_" + TRAIN_SCALARS["accuracy"].name, objective)[2] <= 1

    # a job stopped while it starts
    assert main(["submit", "--address", url, "--env", "DS_ACCELERATOR=cpu", "--"] + train("stopped")) == 0
    job_id = re.search(r"submitted (\S+):", capsys.readouterr().out).group(1)
    assert main(["jobs", "stop", job_id, "--address", url]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} STOPPED"
