"""Starting or joining Ray, and free local ports (local apps, tests, benchmarks)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

# Ray Data's per-dataset chatter: progress hints and "Starting execution"/"execution finished" lines
RAY_DATA_CHATTER = ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor")


def interactive() -> bool:
    """Whether a person watches this process's output on a terminal (progress bars are drawn there;
    a log file gets sentences instead)."""
    return sys.stderr.isatty()


def quiet_progress(progress: bool) -> None:
    """Hugging Face's progress bars (weight loading, downloads) only when ``progress``; set before Ray
    starts, the choice reaches the embedded node's workers through the environment."""
    if progress:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()


def quiet_ray_data(progress: bool) -> None:
    """Ray Data in this process: progress bars only when ``progress``; otherwise no progress blocks
    and no per-dataset INFO lines (its warnings and errors still show)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = progress
    ctx.print_on_execution_start = progress
    for name in RAY_DATA_CHATTER:
        logging.getLogger(name).setLevel(logging.NOTSET if progress else logging.ERROR)


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start an embedded local Ray on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # the Train controller polls workers at this interval; each report waits for a poll
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # on an embedded node there are no drains to watch for, and Ray Train's preemption watcher logs an
    # error at every start (its restartable actor's arguments live in the object store)
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    quiet_progress(interactive())
    quiet_ray_data(interactive())
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        # with its dashboard: the state API lives there, and Ray Train's placement-group cleaner
        # polls it (warning every second without it); port 0 is any free one, on loopback
        context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=0, configure_logging=True,
                           logging_level=logging.WARNING)
        logging.getLogger(__name__).info("started an embedded Ray on loopback; its dashboard is at http://%s",
                                         context.dashboard_url)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` right now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
