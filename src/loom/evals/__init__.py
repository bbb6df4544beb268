"""Evaluation: golden sets, metrics, reports, promotion gates, and feedback turned into training rows."""
