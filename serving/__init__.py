"""Moray serving: the Ray Serve app for mixed policies (mixing and the HTTP API land here)."""
