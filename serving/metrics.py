"""Serving metrics, from every replica of the Serve app (Serve adds ``deployment``, ``replica``,
``application``): requests by route, mixing mode and HTTP status, end-to-end latency and time to
first token (histograms), generated tokens (``rate()`` gives tokens/s), soup-cache hits and
misses, the objective weights requested (a histogram per objective) and decode batch sizes."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from trainers.core.metrics import MetricSpec, make_metric

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SERVE: Dict[str, MetricSpec] = {s.name: s for s in [
    MetricSpec("moray_serve_requests", "counter", "Requests answered, by route, mixing mode and HTTP status",
               ("route", "mixing", "status")),
    MetricSpec("moray_serve_latency_seconds", "histogram", "Seconds from a request's arrival to its last token",
               ("route", "mixing"), LATENCY_BUCKETS, "s"),
    MetricSpec("moray_serve_first_token_seconds", "histogram", "Seconds from a request's arrival to its first text",
               ("route", "mixing"), LATENCY_BUCKETS, "s"),
    MetricSpec("moray_serve_generated_tokens", "counter", "Tokens generated (rate: tokens per second)", ("mixing",)),
    MetricSpec("moray_serve_soup_cache", "counter", "Soup-mode batches by cache result (hit: merged weights reused)",
               ("result",)),
    MetricSpec("moray_serve_objective_weight", "histogram", "Objective weights requested (after normalisation)",
               ("objective",), tuple(round(0.1 * i, 1) for i in range(1, 11))),
    MetricSpec("moray_serve_batch_size", "histogram", "Requests decoded together in one batch", ("mixing",),
               (1, 2, 4, 8, 16, 32, 64)),
]}


def serving_specs() -> List[MetricSpec]:
    return list(SERVE.values())


class ServingMetrics:
    """The Serve app's metrics (one per replica; ``ray.serve.metrics`` adds the replica's tags)."""

    def __init__(self):
        from ray.serve import metrics as serve_metrics

        self.m = {name: make_metric(spec, serve_metrics) for name, spec in SERVE.items()}

    def request(self, route: str, mixing: str, status: int, seconds: Optional[float] = None,
                first_token_s: Optional[float] = None, tokens: int = 0) -> None:
        tags = {"route": route, "mixing": mixing}
        self.m["moray_serve_requests"].inc(tags={**tags, "status": str(status)})
        if seconds is not None:
            self.m["moray_serve_latency_seconds"].observe(seconds, tags=tags)
        if first_token_s is not None:
            self.m["moray_serve_first_token_seconds"].observe(first_token_s, tags=tags)
        if tokens:
            self.m["moray_serve_generated_tokens"].inc(tokens, tags={"mixing": mixing})

    def weights(self, names: Sequence[str], weights: Sequence[float]) -> None:
        for name, w in zip(names, weights):
            self.m["moray_serve_objective_weight"].observe(float(w), tags={"objective": name})

    def batch(self, mixing: str, size: int, soup_cache_hit: Optional[bool]) -> None:
        self.m["moray_serve_batch_size"].observe(size, tags={"mixing": mixing})
        if soup_cache_hit is not None:
            self.m["moray_serve_soup_cache"].inc(tags={"result": "hit" if soup_cache_hit else "miss"})
