"""Evaluation and lineage: golden sets, metrics, promotion gates, tracing versions to their data."""
