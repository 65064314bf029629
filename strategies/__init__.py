"""Aggregation strategies, chosen by name or "module:Class"."""
