"""Moray reward side: objective scorers, offline prompts, on-policy pair making."""
