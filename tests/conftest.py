"""Shared fixtures: a tiny Llama with a tokenizer trained here (no downloads), preference files."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the endpoint within a second

from reward_models.prompts import tiny_corpus  # noqa: E402
from trainers.models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """An embedded 2-CPU Ray on loopback for the tests of one module."""
    import ray

    from trainers.launcher import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def make_policy(src: str, out, seed: int, noise: float = 0.05, **meta) -> str:
    """A Moray policy directory: ``src`` nudged by seeded noise (see ``nudged_copy``)."""
    from trainers.models import nudged_copy

    return nudged_copy(src, str(out), seed, noise, meta)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), tiny_corpus(400, seed=0))


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def synthetic_pairs(n: int, seed: int = 0):
    """Pairs labelled by a known rule: the chosen response is positive, the rejected negative."""
    rng = random.Random(seed)
    pos = ["great", "lovely", "wonderful", "happy", "good"]
    neg = ["awful", "terrible", "sad", "bad", "boring"]
    rows = []
    for i in range(n):
        topic = rng.choice(["coffee", "movie", "book", "park", "song"])
        k = 1 + i % 4
        rows.append({"prompt": f"Write about the {topic}.",
                     "chosen": f"The {topic} is " + " and ".join(rng.choices(pos, k=k)) + ".",
                     "rejected": f"The {topic} is " + " and ".join(rng.choices(neg, k=1 + (i + 1) % 4)) + "."})
    return rows


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", synthetic_pairs(48))
