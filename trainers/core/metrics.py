"""What a Moray metric is (name, kind, tags, buckets, Grafana unit) and how it becomes a Ray metric
(``ray.util.metrics`` or ``ray.serve.metrics``, exported with Ray's ``ray_`` prefix). The metrics
themselves are defined beside their producers: ``trainers.training_metrics`` and ``serving.metrics``."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class MetricSpec:
    name: str          # without Ray's ``ray_`` prefix
    kind: str          # gauge | counter | histogram
    description: str
    tags: Tuple[str, ...]
    boundaries: Tuple[float, ...] = ()
    unit: str = "short"  # Grafana unit of its panel


def make_metric(spec: MetricSpec, module: Any = None):
    """A Ray metric object for ``spec`` (``module``: ``ray.util.metrics`` by default)."""
    if module is None:
        from ray.util import metrics as module
    if spec.kind == "gauge":
        return module.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "counter":
        return module.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    return module.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                            tag_keys=spec.tags)


class BestEffort:
    """Calls into a metrics exporter that never stop the work they describe: the first failure is
    logged once and the exporter is dropped."""

    def __init__(self, make: Callable[[], Any], what: str):
        self.what, self.target = what, None
        self.call(lambda: setattr(self, "target", make()))

    def __bool__(self) -> bool:
        return self.target is not None

    def call(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # the exporter is best effort
            logging.getLogger(__name__).warning("metrics not published (%s); %s goes on", e, self.what)
            self.target = None


def report_interval_s() -> float:
    """Seconds between two exports of a process's metrics to its node's agent (Ray floors it at 1 s)."""
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 1000


class Republisher:
    """Sets the last value of every gauge series again each half report interval until :meth:`close`:
    Ray's metrics agent drops a gauge two report intervals after its last set, and an optimizer step
    may take longer than that (the panels would show gaps while the job is healthy)."""

    def __init__(self, every_s: Optional[float] = None):
        self.every_s = every_s if every_s is not None else report_interval_s() / 2
        self._last: Dict[Tuple[int, Tuple[Tuple[str, str], ...]], Tuple[Any, float, Dict[str, str]]] = {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: Optional[threading.Thread] = None

    def set(self, gauge: Any, value: float, tags: Mapping[str, str]) -> None:
        gauge.set(value, tags=dict(tags))
        with self._lock:
            self._last[(id(gauge), tuple(sorted(tags.items())))] = (gauge, value, dict(tags))
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="moray-metrics", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                last = list(self._last.values())
            try:
                for gauge, value, tags in last:
                    gauge.set(value, tags=tags)
            except Exception as e:  # the exporter is best effort
                logging.getLogger(__name__).warning("metrics no longer re-published (%s)", e)
                return

    def close(self) -> None:
        """Stop re-publishing: the gauges leave the endpoint two report intervals later."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
