"""Metric definitions: which gauges a training step sets, and the Grafana dashboard built from the
same definitions (the metrics themselves are read back from Ray's endpoint in test_jobs.py and
tests/serving/test_app.py)."""

import json
import re
from pathlib import Path

from cluster.metrics import TRAIN_FAMILIES, TRAIN_SCALARS, all_specs, grafana_dashboard, training_series

ROOT = Path(__file__).resolve().parents[2]


def test_training_series_tags_per_objective_entries_with_their_objective():
    step = {"loss": 0.5, "accuracy": 0.75, "step": 3, "step_pairs": 8.0, "epoch": 0, "history": [],
            "alpha/sentiment": 0.3, "alpha/conciseness": 0.7, "grad_norm/sentiment": 2.0, "grad_cosine": -0.2,
            "lambda/sentiment": 0.1, "constraint/sentiment": 0.45, "reward/sentiment": float("nan"),
            "unknown/sentiment": 1.0, "chosen_reward": 0.1, "flag": True}
    got = {(spec.name, objective): value for spec, objective, value in training_series(step)}
    assert got == {
        ("moray_train_loss", None): 0.5, ("moray_train_accuracy", None): 0.75, ("moray_train_step", None): 3.0,
        ("moray_train_gapo_alpha", "sentiment"): 0.3, ("moray_train_gapo_alpha", "conciseness"): 0.7,
        ("moray_train_gapo_grad_norm", "sentiment"): 2.0, ("moray_train_gapo_grad_cosine", None): -0.2,
        ("moray_train_mopo_lambda", "sentiment"): 0.1, ("moray_train_mopo_constraint", "sentiment"): 0.45,
    }
    # WRPO's scalar alpha and GAPO's alpha/<k> are different series
    assert training_series({"alpha": 0.05})[0][0].name == "moray_train_wrpo_alpha"


def test_every_key_a_method_logs_is_published():
    """The per-step keys the tasks emit (balancing.Balance.log, GAPO, MOPO, WRPO, online GAPO)."""
    sources = " ".join((ROOT / f).read_text() for f in ("trainers/balancing.py", "trainers/gapo.py",
                                                         "trainers/mopo_job.py", "trainers/gapo_online.py"))
    families = set(re.findall(r'f"([a-z_]+)/\{', sources))
    assert families and families <= set(TRAIN_FAMILIES), families - set(TRAIN_FAMILIES)
    assert {"grad_cosine", "alpha", "empty_fraction", "loss", "reward_margin", "accuracy", "pairs_per_s"} <= set(TRAIN_SCALARS)


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
