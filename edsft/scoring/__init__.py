"""Scoring: the base model's uncertainty on its own response (uncertainty.py) and the batch Scorer (scorer.py)."""
