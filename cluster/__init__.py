"""Moray operations: the `moray` command line, the demo, and (later) cluster configs."""
