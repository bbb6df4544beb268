"""Evaluation: golden sets, metrics, reports, promotion gates."""
