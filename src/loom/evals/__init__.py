"""Evaluation: golden sets, scorers, paired statistics, eval results, gates and promotion.

Import the submodules directly (``from loom.evals.golden import load_golden``); this package
imports nothing so that each part stays independent.
"""
