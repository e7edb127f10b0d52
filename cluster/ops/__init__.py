"""Cluster operations: Ray Jobs submission, metrics read back from nodes, cluster configs, Grafana."""
