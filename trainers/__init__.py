"""Moray trainers: preference data, losses, DeepSpeed engine, Ray Train launching, export."""
