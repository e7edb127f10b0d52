"""Moray on top: the `moray` command line (cli/), the recipes that chain its commands (recipes/: demo,
study, base models) and cluster operations (ops/: Ray Jobs, metrics, cluster configs, Grafana)."""
