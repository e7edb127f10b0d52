"""Moray's shared core: model and tokenizer loading, HF export, config helpers, prompt rendering,
sequence log-probs, objective-weight checks and metric definitions. It imports nothing else of
Moray's, so every package (trainers, reward_models, serving, cluster) can build on it."""
