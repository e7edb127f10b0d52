"""Moray's metrics seen from the cluster: read back from every node's Prometheus endpoint, and the
Grafana dashboard built from their definitions (training's in :mod:`trainers.training_metrics`, serving's in
:mod:`serving.metrics`, where their producers define them).

Ray exports every metric with a ``ray_`` prefix from each node's metrics endpoint (``ray start
--metrics-export-port``; Prometheus scrapes it, the Ray dashboard's Metrics page reads Prometheus).

``python -m cluster.ops.metrics > cluster/ops/grafana/moray.json`` writes the Grafana dashboard.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Sequence, Tuple

from trainers.core.metrics import MetricSpec
from trainers.training_metrics import TRAIN_FAMILIES, TRAIN_ROWS, TRAIN_SCALARS, read_final


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


def final_samples() -> List[Sample]:
    """The last training gauges of every finished job of the connected cluster (kept in Ray's KV
    store: a gauge leaves the endpoint two report intervals after its job ends)."""
    return [(s.name, dict(s.labels), s.value) for s in read_final()]


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

    def gauge(spec: MetricSpec, legend: str = by_run) -> Tuple[str, str]:
        return f"ray_{spec.name}{job}", legend

    for key in ("loss", "reward_margin", "accuracy", "rows_per_s", "tokens_per_s", "lr", "step"):
        s = TRAIN_SCALARS[key]
        title = {"lr": "learning rate", "rows_per_s": "rows per second", "tokens_per_s": "tokens per second"}
        add(f"Training: {title.get(key, key.replace('_', ' '))}", [gauge(s)], s.unit, s.description)
    add("Training: rows trained per second (counter rate)",
        [(f"sum by (run, objective) (rate(ray_{TRAIN_ROWS.name}_total{job}[1m]))", by_run)])
    for key in ("loss", "margin", "accuracy", "reward"):
        s = TRAIN_FAMILIES[key]
        add(f"Per objective: {'reward margin' if key == 'margin' else key}", [gauge(s)], description=s.description)
    add("GAPO: alpha and gradient norms", [gauge(TRAIN_FAMILIES["alpha"], "alpha " + by_run),
                                          gauge(TRAIN_FAMILIES["grad_norm"], "|g| " + by_run)])
    add("GAPO: gradient cosine", [gauge(TRAIN_SCALARS["grad_cosine"])],
        description=TRAIN_SCALARS["grad_cosine"].description)
    add("MOPO: lambda", [gauge(TRAIN_FAMILIES["lambda"])])
    add("MOPO: constraint values and thresholds",
        [gauge(TRAIN_FAMILIES["constraint"], "value " + by_run), gauge(TRAIN_FAMILIES["threshold"], "threshold " + by_run)])
    add("WRPO: alpha", [gauge(TRAIN_SCALARS["alpha"])], description=TRAIN_SCALARS["alpha"].description)
    for key in ("empty_fraction", "kl"):
        s = TRAIN_SCALARS[key]
        add(f"Online GAPO: {'empty samples' if key == 'empty_fraction' else 'KL estimate'}", [gauge(s)], s.unit,
            s.description)
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
    add("Serving: batch size p50 / p95",
        [(f'histogram_quantile({q}, sum by (le, mixing) (rate(ray_moray_serve_batch_size_bucket[5m])))',
          f"p{int(q * 100)} {{{{mixing}}}}") for q in (0.5, 0.95)], description="Requests decoded together")
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
