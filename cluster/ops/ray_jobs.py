"""``moray submit`` and ``moray jobs``: Moray commands as Ray Jobs on a cluster.

``moray submit [--address URL] [--working-dir DIR] [--pip PKG ...] [--env K=V ...] -- train dpo ...``
checks the command with Moray's own parser on this machine (a misspelt flag fails here, not on
the cluster), submits it through ``JobSubmissionClient`` with the runtime env, and prints the job
id and its dashboard page. Several submissions run side by side: Ray Jobs starts each driver at
once and Ray schedules their workers on the cluster's resources.

The address is the dashboard's (``http://HEAD:8265``); without ``--address`` Ray's own lookup
applies (``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS``, then a local cluster). Ray's token
authentication stays on: the client sends the token from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (``RAY_AUTH_MODE=token`` is set for it here).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 30  # how long a submission waits for a freshly started head's job agent

log = logging.getLogger(__name__)


def client(address: Optional[str] = None):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def runtime_env(working_dir: Optional[str] = None, pip: Sequence[str] = (), env: Sequence[str] = ()) -> Dict[str, Any]:
    """A Ray runtime env: the working dir to upload, pip packages (or one ``-r``-style requirements
    file), ``KEY=VALUE`` environment variables."""
    out: Dict[str, Any] = {}
    if working_dir:
        if not os.path.isdir(working_dir):
            raise FileNotFoundError(f"--working-dir {working_dir}: no such directory")
        out["working_dir"] = working_dir
    if pip:
        if len(pip) == 1 and pip[0].endswith(".txt"):
            if not os.path.isfile(pip[0]):
                raise FileNotFoundError(f"--pip {pip[0]}: no such requirements file")
            out["pip"] = os.path.abspath(pip[0])
        else:
            out["pip"] = list(pip)
    if env:
        env_vars = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--env {item!r}: expected KEY=VALUE")
            env_vars[key] = value
        out["env_vars"] = env_vars
    return out


def submit(cmd: Sequence[str], address: Optional[str] = None, env: Optional[Dict[str, Any]] = None,
           submission_id: Optional[str] = None) -> Dict[str, str]:
    """Submit a checked Moray command; returns ``{"job_id", "dashboard", "entrypoint"}``."""
    c = client(address)
    entrypoint = "python -m cluster.cli " + shlex.join(list(cmd))
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = c.submit_job(entrypoint=entrypoint, runtime_env=env or None, submission_id=submission_id,
                                  metadata={"moray_command": shlex.join(list(cmd))})
            break
        except RuntimeError as e:  # a head that just started: its job agent is not up yet
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            log.warning("the cluster's job agent is not up yet; submitting again in 2 s")
            time.sleep(2)
    return {"job_id": job_id, "dashboard": f"{c.get_address()}/#/jobs/{job_id}", "entrypoint": entrypoint}


def follow(job_id: str, address: Optional[str] = None, out=None) -> str:
    """Stream a job's logs (to ``out``, default stdout) until it ends; its final status."""
    c = client(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    while (status := str(c.get_job_status(job_id).value)) not in TERMINAL:  # logs end just before the status
        time.sleep(0.5)
    return status


def list_jobs(address: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every job of the cluster, oldest first: id, status, start, seconds, command."""
    rows = []
    for j in client(address).list_jobs():
        end = j.end_time or time.time() * 1000
        rows.append({"job_id": j.submission_id or j.job_id, "status": str(j.status.value),
                     "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "",
                     "seconds": round((end - j.start_time) / 1000) if j.start_time else None,
                     "command": (j.metadata or {}).get("moray_command", j.entrypoint)})
    return sorted(rows, key=lambda r: r["start"])


def format_jobs(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [f"{'job id':<34} {'status':<10} {'started':<20} {'s':>6}  command"]
    for r in rows:
        cmd = r["command"] if len(r["command"]) <= 70 else r["command"][:67] + "..."
        lines.append(f"{r['job_id']:<34} {r['status']:<10} {r['start']:<20} {r['seconds'] or '':>6}  {cmd}")
    return "\n".join(lines)


def status(job_id: str, address: Optional[str] = None) -> Dict[str, Any]:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "exit_code": getattr(info, "driver_exit_code", None), "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time}


def logs(job_id: str, address: Optional[str] = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: Optional[str] = None, wait_s: float = 0.0) -> str:
    """Ask the job to stop; with ``wait_s``, wait that long for it to end. Its status."""
    c = client(address)
    c.stop_job(job_id)
    deadline = time.time() + wait_s
    while (s := str(c.get_job_status(job_id).value)) not in TERMINAL and time.time() < deadline:
        time.sleep(0.5)
    return s
