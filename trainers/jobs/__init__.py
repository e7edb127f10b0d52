"""The table of training jobs: ``moray train <name>``, ``moray config <name>`` and their dispatch
all read :data:`JOBS`. A new job is one file here (its config, task, ``run`` and ``JOB``) and one
line below."""

from trainers.job import Job
from trainers.jobs import conditioned, dpo, gapo, mopo, reward, wrpo

JOBS = {job.name: job for job in (
    dpo.JOB,
    gapo.JOB,
    mopo.JOB,
    wrpo.JOB,
    conditioned.JOB,
    reward.JOB,
)}


def get_job(name: str) -> Job:
    try:
        return JOBS[name]
    except KeyError:
        raise ValueError(f"unknown job {name!r}; known: {sorted(JOBS)}") from None
