"""Starting or joining Ray, and free local ports (local apps, tests, benchmarks)."""

from __future__ import annotations

import logging
import os
from typing import Optional


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start an embedded local Ray on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # the Train controller polls workers at this interval; each report waits for a poll
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray

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
