"""Moray's metrics on the Ray dashboard and Prometheus (``ray.util.metrics``), and the Grafana
dashboard built from the same definitions.

Ray exports every metric with a ``ray_`` prefix from each node's metrics endpoint (``ray start
--metrics-export-port``; Prometheus scrapes it, the Ray dashboard's Metrics page reads Prometheus).

Training (rank 0 of every Ray Train job, after each optimizer step; tags ``run``, ``method``,
``objective``): the loss, reward margin, accuracy, pairs/s, tokens/s, learning rate and step of
the job, and per objective the entries a method logs -- GAPO's α and gradient norms, MOPO's λ,
constraint values and thresholds, per-objective losses, margins and accuracies, online rewards;
a counter of pairs trained.

Serving (every replica of the Serve app; Serve adds ``deployment``, ``replica``, ``application``):
requests by route, mixing mode and HTTP status, end-to-end latency and time to first token
(histograms), generated tokens (``rate()`` gives tokens/s), soup-cache hits and misses, the
objective weights requested (a histogram per objective) and decode batch sizes.

``python -m cluster.metrics > cluster/grafana/moray.json`` writes the Grafana dashboard.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class MetricSpec:
    name: str          # without Ray's ``ray_`` prefix
    kind: str          # gauge | counter | histogram
    description: str
    tags: Tuple[str, ...]
    boundaries: Tuple[float, ...] = ()
    unit: str = "short"  # Grafana unit of its panel


TRAIN_TAGS = ("run", "method", "objective")

# a training job's scalar entries -> gauges
TRAIN_SCALARS: Dict[str, MetricSpec] = {key: MetricSpec(name, "gauge", desc, TRAIN_TAGS, unit=unit) for key, name, desc, unit in [
    ("loss", "moray_train_loss", "Training loss, mean over the pairs of the last optimizer step", "short"),
    ("reward_margin", "moray_train_reward_margin", "Mean implicit reward margin beta*(chosen - rejected) log-ratio", "short"),
    ("accuracy", "moray_train_accuracy", "Fraction of pairs whose chosen response has the higher implicit reward", "percentunit"),
    ("pairs_per_s", "moray_train_pairs_per_second", "Pairs (prompts for MOPO) trained per second, all workers", "short"),
    ("tokens_per_s", "moray_train_tokens_per_second", "Tokens through the model per second, all workers", "short"),
    ("lr", "moray_train_learning_rate", "Learning rate of the last optimizer step", "short"),
    ("step", "moray_train_step", "Optimizer steps done", "short"),
    ("grad_cosine", "moray_train_gapo_grad_cosine", "GAPO: cosine between the two objectives' gradients", "short"),
    ("alpha", "moray_train_wrpo_alpha", "WRPO: weight of the source models' chosen responses", "short"),
    ("empty_fraction", "moray_train_online_empty_fraction", "Online GAPO: fraction of empty samples", "percentunit"),
]}

# a method's per-objective entries ``family/<objective>`` -> gauges tagged with that objective
TRAIN_FAMILIES: Dict[str, MetricSpec] = {key: MetricSpec(name, "gauge", desc, TRAIN_TAGS) for key, name, desc in [
    ("loss", "moray_train_objective_loss", "Per-objective loss (GAPO)"),
    ("margin", "moray_train_objective_reward_margin", "Per-objective implicit reward margin in that objective's orientation (GAPO)"),
    ("accuracy", "moray_train_objective_accuracy", "Per-objective pair accuracy (GAPO)"),
    ("reward", "moray_train_objective_reward", "Online GAPO: mean score of the policy's samples"),
    ("alpha", "moray_train_gapo_alpha", "GAPO: the objective's coefficient in the balanced gradient"),
    ("grad_norm", "moray_train_gapo_grad_norm", "GAPO: norm of the objective's gradient"),
    ("lambda", "moray_train_mopo_lambda", "MOPO: the constraint's Lagrange multiplier"),
    ("constraint", "moray_train_mopo_constraint", "MOPO: the constraint's win-rate under the current policy weights"),
    ("threshold", "moray_train_mopo_threshold", "MOPO: the constraint's threshold"),
]}

TRAIN_PAIRS = MetricSpec("moray_train_pairs", "counter", "Pairs (prompts for MOPO) trained", TRAIN_TAGS)

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


def all_specs() -> List[MetricSpec]:
    return list(TRAIN_SCALARS.values()) + list(TRAIN_FAMILIES.values()) + [TRAIN_PAIRS] + list(SERVE.values())


def _make(spec: MetricSpec, module: Any = None):
    """A Ray metric object for ``spec`` (``module``: ``ray.util.metrics`` or ``ray.serve.metrics``)."""
    if module is None:
        from ray.util import metrics as module
    if spec.kind == "gauge":
        return module.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "counter":
        return module.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    return module.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                            tag_keys=spec.tags)


class TrainingMetrics:
    """Publishes a training job's per-step metrics (call on one worker: rank 0)."""

    def __init__(self, run: str, method: str, objective: str):
        self.tags = {"run": run, "method": method, "objective": objective}
        self._gauges: Dict[str, Any] = {}
        self._pairs = _make(TRAIN_PAIRS)

    def _gauge(self, spec: MetricSpec):
        if spec.name not in self._gauges:
            self._gauges[spec.name] = _make(spec)
        return self._gauges[spec.name]

    def record(self, metrics: Mapping[str, Any]) -> None:
        for spec, objective, value in training_series(metrics):
            self._gauge(spec).set(value, tags={**self.tags, "objective": objective} if objective else self.tags)
        if metrics.get("step_pairs"):
            self._pairs.inc(float(metrics["step_pairs"]), tags=self.tags)


def training_series(metrics: Mapping[str, Any]) -> List[Tuple[MetricSpec, Optional[str], float]]:
    """The gauges a step's metrics set: ``(spec, objective or None, value)``. ``family/<objective>``
    keys of :data:`TRAIN_FAMILIES` are tagged with their objective; other keys of
    :data:`TRAIN_SCALARS` with the job's; anything else (and NaN) is not published."""
    out = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            continue
        family, _, objective = key.partition("/")
        if objective and family in TRAIN_FAMILIES:
            out.append((TRAIN_FAMILIES[family], objective, float(value)))
        elif not objective and key in TRAIN_SCALARS:
            out.append((TRAIN_SCALARS[key], None, float(value)))
    return out


class ServingMetrics:
    """The Serve app's metrics (one per replica; ``ray.serve.metrics`` adds the replica's tags)."""

    def __init__(self):
        from ray.serve import metrics as serve_metrics

        self.m = {name: _make(spec, serve_metrics) for name, spec in SERVE.items()}

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


# -- reading them back ------------------------------------------------------------------------

def node_metrics_urls() -> List[str]:
    """The Prometheus endpoint of every alive node of the connected Ray cluster."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


Sample = Tuple[str, Dict[str, str], float]


def read_metrics(url: str, prefix: str = "ray_moray_", timeout: float = 10.0) -> List[Sample]:
    """``(name, labels, value)`` of every sample at a Prometheus endpoint whose name starts with
    ``prefix`` (histograms as their ``_bucket``/``_sum``/``_count`` samples, counters as ``_total``)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=timeout).text
    return [(s.name, dict(s.labels), float(s.value)) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith(prefix)]


def total(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


# -- Grafana -----------------------------------------------------------------------------------

def _panel(pid: int, title: str, exprs: Sequence[Tuple[str, str]], x: int, y: int, unit: str = "short",
           description: str = "") -> Dict[str, Any]:
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description, "datasource": "${datasource}",
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"expr": e, "legendFormat": legend, "refId": chr(ord("A") + i)} for i, (e, legend) in enumerate(exprs)],
    }


def grafana_dashboard() -> Dict[str, Any]:
    """A Grafana dashboard over every Moray metric (Prometheus names carry Ray's ``ray_`` prefix)."""
    job = '{run=~"$run"}'
    panels: List[Dict[str, Any]] = []

    def add(title: str, exprs: Sequence[Tuple[str, str]], unit: str = "short", description: str = "") -> None:
        i = len(panels)
        panels.append(_panel(i + 1, title, exprs, 12 * (i % 2), 8 * (i // 2), unit, description))

    by_run = "{{run}} {{objective}}"
    for key in ("loss", "reward_margin", "accuracy", "pairs_per_s"):
        s = TRAIN_SCALARS[key]
        add(f"Training: {key.replace('_', ' ')}", [(f"ray_{s.name}{job}", by_run)], s.unit, s.description)
    add("Training: pairs trained per second (counter rate)",
        [(f"sum by (run, objective) (rate(ray_{TRAIN_PAIRS.name}_total{job}[1m]))", by_run)])
    for key in ("loss", "accuracy", "reward"):
        s = TRAIN_FAMILIES[key]
        add(f"Per objective: {key}", [(f"ray_{s.name}{job}", by_run)], description=s.description)
    add("GAPO: alpha and gradient norms", [(f"ray_{TRAIN_FAMILIES['alpha'].name}{job}", "alpha {{run}} {{objective}}"),
                                          (f"ray_{TRAIN_FAMILIES['grad_norm'].name}{job}", "|g| {{run}} {{objective}}")])
    add("MOPO: lambda", [(f"ray_{TRAIN_FAMILIES['lambda'].name}{job}", by_run)])
    add("MOPO: constraint values and thresholds",
        [(f"ray_{TRAIN_FAMILIES['constraint'].name}{job}", "value " + by_run),
         (f"ray_{TRAIN_FAMILIES['threshold'].name}{job}", "threshold " + by_run)])
    add("WRPO: alpha", [(f"ray_{TRAIN_SCALARS['alpha'].name}{job}", by_run)])
    add("Serving: requests per second by status",
        [('sum by (status, mixing) (rate(ray_moray_serve_requests_total[1m]))', "{{mixing}} {{status}}")], "reqps")
    add("Serving: latency p50 / p95",
        [(f'histogram_quantile({q}, sum by (le, mixing) (rate(ray_moray_serve_latency_seconds_bucket[5m])))',
          f"p{int(q * 100)} {{{{mixing}}}}") for q in (0.5, 0.95)], "s")
    add("Serving: time to first token p50 / p95",
        [(f'histogram_quantile({q}, sum by (le, mixing) (rate(ray_moray_serve_first_token_seconds_bucket[5m])))',
          f"p{int(q * 100)} {{{{mixing}}}}") for q in (0.5, 0.95)], "s")
    add("Serving: tokens per second", [("sum by (mixing) (rate(ray_moray_serve_generated_tokens_total[1m]))",
                                        "{{mixing}}")])
    add("Serving: soup cache", [("sum by (result) (rate(ray_moray_serve_soup_cache_total[5m]))", "{{result}}")])
    add("Serving: mean objective weight requested",
        [("sum by (objective) (rate(ray_moray_serve_objective_weight_sum[5m])) / "
          "sum by (objective) (rate(ray_moray_serve_objective_weight_count[5m]))", "{{objective}}")],
        description="Ray exports a histogram's sum from its bucket midpoints: within 0.05")
    add("Serving: replicas", [('count by (deployment) (ray_serve_deployment_replica_healthy{deployment="MixedPolicy"})',
                               "{{deployment}}")])
    return {
        "title": "Moray", "uid": "moray", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "tags": ["moray", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
            {"name": "run", "type": "query", "datasource": "${datasource}", "includeAll": True, "multi": True,
             "allValue": ".*", "query": f"label_values(ray_{TRAIN_SCALARS['step'].name}, run)", "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    json.dump(grafana_dashboard(), sys.stdout, indent=2)
    sys.stdout.write("\n")
