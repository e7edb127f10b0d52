"""Recipes chaining the `moray` commands: the demo, the study, and the base models they start from."""
