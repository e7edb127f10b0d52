"""Shared fixtures: an embedded Ray, a tiny Llama with a tokenizer trained here (no downloads), a
preference file. Helpers that are not fixtures live in ``tests/helpers.py``."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the endpoint within a second
# token auth on from the start, as ray.init and `moray jobs` turn it on: importing ray fixes the mode for the
# process, and a later change (a Jobs client) would leave this process without auth and its new nodes with it
os.environ.setdefault("RAY_AUTH_MODE", "token")

from cluster.recipes.base_models import build_tiny_model  # noqa: E402
from reward_models.prompts import tiny_corpus  # noqa: E402
from tests.helpers import synthetic_pairs, write_jsonl  # noqa: E402


_status = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    _status["exit"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own status once everything is reported. The CI run's 293 passing tests
    were followed once by a segfault during interpreter finalization (native Ray/torch threads
    torn down after Python's), which turned a green run red; skipping that teardown keeps the
    status the tests' own."""
    import sys

    if "exit" in _status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status["exit"])


@pytest.fixture(scope="module")
def ray_local():
    """An embedded 2-CPU Ray on loopback for the tests of one module."""
    import ray

    from trainers.core.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), tiny_corpus(400, seed=0))


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", synthetic_pairs(48))
