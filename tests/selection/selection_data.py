"""Seeded synthetic pools shared by the selection tests."""

import numpy as np

SCORE_COLUMNS = ("mean_entropy", "max_entropy", "least_confidence", "least_confidence_norm", "mean_margin", "min_margin")


def blobs(n, d, k=6, seed=0, spread=3.0):
    """Gaussian blobs (float32) and their blob labels."""
    r = np.random.default_rng(seed)
    centers = r.normal(size=(k, d)) * spread
    lab = r.integers(k, size=n)
    return (centers[lab] + r.normal(size=(n, d))).astype(np.float32), lab


def score_table(n, seed=0):
    r = np.random.default_rng(seed + 1000)
    return {c: r.random(n) for c in SCORE_COLUMNS}
