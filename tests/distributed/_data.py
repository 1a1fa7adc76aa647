"""Synthetic scores.parquet with the scoring stage's schema: clustered (Gaussian blob) embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORE_COLUMNS = ("mean_entropy", "max_entropy", "least_confidence", "least_confidence_norm", "mean_margin", "min_margin")


def blobs(n: int, d: int, centers: int, seed: int, spread: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(centers, d)).astype(np.float32)
    lab = rng.integers(centers, size=n)
    return (C[lab] + spread * rng.normal(size=(n, d))).astype(np.float32)


def write_scores(
    folder: Path,
    n: int = 2400,
    d: int = 16,
    centers: int = 12,
    seed: int = 0,
    files: int = 3,
    row_group_size: int = 500,
    tasks: tuple[str, ...] = ("qa", "math", "code", "chat"),
) -> Path:
    """A folder of `files` Parquet parts (several row groups each) holding n rows; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    X = blobs(n, d, centers, seed)
    ids = np.array([f"r{seed}-{i:07d}" for i in range(n)])
    task = rng.choice(np.array(tasks), size=n)
    # per-task confidence differs, so task_balanced's allocation is not uniform
    base = {t: 0.2 + 0.6 * k / max(1, len(tasks) - 1) for k, t in enumerate(tasks)}
    p_top = np.clip(np.array([base[t] for t in task]) + 0.15 * rng.normal(size=n), 0.01, 0.99)
    cols = {
        "mean_entropy": rng.gamma(2.0, 0.5, size=n) * (1.5 - p_top),
        "max_entropy": rng.gamma(3.0, 0.5, size=n),
        "least_confidence": 1.0 - p_top,
        "least_confidence_norm": np.clip(1.0 - p_top + 0.05 * rng.normal(size=n), 0, 1),
        "mean_margin": np.clip(p_top - 0.1, 0, 1),
        "min_margin": rng.uniform(size=n) * p_top,
    }
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        s, e = bounds[f], bounds[f + 1]
        t = pa.table(
            {
                "row_id": pa.array(ids[s:e]),
                "task": pa.array(task[s:e]),
                **{c: pa.array(cols[c][s:e].astype(np.float64)) for c in SCORE_COLUMNS},
                "prompt_tokens": pa.array(rng.integers(5, 200, size=e - s)),
                "response_tokens": pa.array(rng.integers(1, 24, size=e - s)),
                "generated": pa.array(["..."] * (e - s)),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X[s:e].ravel()), d),
            }
        )
        pq.write_table(t, folder / f"part-{f:05d}.parquet", row_group_size=row_group_size)
    return folder


def read_pool(folder: Path):
    """(row_ids, tasks, scores, X) of the whole synthetic pool, for in-process references."""
    t = pq.read_table(folder)
    X = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(len(t), -1).astype(np.float32)
    S = {c: t.column(c).to_numpy() for c in SCORE_COLUMNS}
    return t.column("row_id").to_numpy(zero_copy_only=False), t.column("task").to_numpy(zero_copy_only=False), S, X
