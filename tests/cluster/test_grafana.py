"""The Grafana dashboard is built from the metric definitions (the metrics themselves are read back
from Ray's endpoint in test_ray_jobs.py and tests/serving/test_app.py)."""

import json
import re
from pathlib import Path

from cluster.metrics import all_specs, grafana_dashboard

ROOT = Path(__file__).resolve().parents[2]


def test_grafana_dashboard_is_the_generated_one_and_names_only_defined_metrics():
    committed = json.loads((ROOT / "cluster" / "grafana" / "moray.json").read_text())
    assert committed == grafana_dashboard(), "regenerate: python -m cluster.metrics > cluster/grafana/moray.json"
    suffix = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    defined = {f"ray_{s.name}{x}" for s in all_specs() for x in suffix[s.kind]}
    exprs = [t["expr"] for p in committed["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\bray_moray_[a-z_]+", e)}
    assert used and used <= defined, used - defined
    ids = [p["id"] for p in committed["panels"]]
    assert len(ids) == len(set(ids))
    # every training family and the serving request counter have a panel
    for name in ("moray_train_loss", "moray_train_gapo_alpha", "moray_train_mopo_lambda", "moray_train_mopo_constraint",
                 "moray_serve_requests_total", "moray_serve_latency_seconds_bucket", "moray_serve_soup_cache_total"):
        assert any("ray_" + name in e for e in exprs), name
