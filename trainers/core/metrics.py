"""What a Moray metric is (name, kind, tags, buckets, Grafana unit) and how it becomes a Ray metric
(``ray.util.metrics`` or ``ray.serve.metrics``, exported with Ray's ``ray_`` prefix). The metrics
themselves are defined beside their producers: ``trainers.metrics`` and ``serving.metrics``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Tuple


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
