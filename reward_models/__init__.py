"""Moray reward side: objective scorers, offline prompts, on-policy pair making."""

# Top-k for every sample Moray draws from a policy or a mix: HF ``generate``'s own default, named
# so that the Serve decoder (whose API default is no top-k) can be asked for the same rule.
GENERATE_TOP_K = 50
