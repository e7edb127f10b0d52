"""The Grafana dashboard is built from the metric definitions, and covers them exactly: a panel for
every metric Moray exports, no panel naming a metric nobody exports (the metrics themselves are read
back from Ray's endpoint in test_ray_jobs.py, tests/serving/test_app.py and, through a real
Prometheus, test_prometheus.py)."""

import json
import re
from pathlib import Path

from cluster.ops.metrics import grafana_dashboard
from tests.helpers import all_specs

ROOT = Path(__file__).resolve().parents[3]
# the series Ray exports for a metric of each kind (with its ``ray_`` prefix)
SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def panel_metrics(dashboard):
    """Each panel's title -> the Moray series its expressions name."""
    return {p["title"]: {n for t in p["targets"] for n in re.findall(r"\bray_moray_[a-z_]+", t["expr"])}
            for p in dashboard["panels"]}


def test_grafana_dashboard_is_the_generated_one():
    committed = json.loads((ROOT / "cluster" / "ops" / "grafana" / "moray.json").read_text())
    assert committed == grafana_dashboard(), "regenerate: python -m cluster.ops.metrics > cluster/ops/grafana/moray.json"
    ids = [p["id"] for p in committed["panels"]]
    assert len(ids) == len(set(ids)) and len(set(panel_metrics(committed))) == len(ids)


def test_every_exported_metric_has_a_panel_and_every_panel_an_exported_metric():
    dashboard = grafana_dashboard()
    series = {f"ray_{s.name}{x}": s.name for s in all_specs() for x in SUFFIXES[s.kind]}
    named = panel_metrics(dashboard)
    unknown = {title: names - set(series) for title, names in named.items() if names - set(series)}
    assert not unknown, f"panels naming metrics nobody exports: {unknown}"
    variable = dashboard["templating"]["list"][1]["query"]
    assert set(re.findall(r"\bray_moray_[a-z_]+", variable)) <= set(series), variable
    shown = {series[n] for names in named.values() for n in names}
    assert not {s.name for s in all_specs()} - shown, "metrics without a panel"
    assert all(names for title, names in named.items() if title.startswith(("Training", "Per objective", "GAPO")))
