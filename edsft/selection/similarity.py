"""Similarities and distances between embeddings, always computed in row chunks.

Nothing here ever materialises an n x n matrix unless asked to (`dense_similarity`, which the
facility-location selector only uses below `dense_max_n`). Everything is float32 BLAS.

Facility location needs a NON-NEGATIVE similarity:
- ``cosine``:    max(0, <x, y> / (|x| |y|))
- ``rbf``:       exp(-gamma * |x - y|^2)
- ``euclidean``: rbf with gamma = 1 / E|x - y|^2 (the mean squared distance of the pool, exact, O(n d)),
  i.e. a typical pair has similarity e^-1. Distributed runs must pass the global ``gamma`` explicitly so
  every shard uses the same similarity (see ``default_gamma``).

Greedy facility location runs on similarities quantised to int16 fixed point (``quantize``:
floor(sim * 32767)). Integer gains are exact and order-independent, so the naive, lazy and stochastic
optimisers see exactly the same numbers and lazy greedy reproduces the naive ranking bit for bit. The
error is < 1/32767 (3e-5) per entry, and int16 halves the memory traffic of the greedy's hot loops.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .base import PoolStatistic

SIM_METRICS = ("cosine", "euclidean", "rbf")
DIST_METRICS = ("cosine", "euclidean")

QUANT_MAX = 32767  # similarity 1.0 -> 32767, the int16 maximum; K - c never overflows int16
QUANT_SCALE = float(QUANT_MAX)
QDTYPE = np.int16

_CHUNK_ELEMS = 1 << 24  # ~64 MB of float32 per temporary block


def n_threads() -> int:
    """Threads for the memory-bound loops: OMP_NUM_THREADS when set (Ray sets it per task), else the CPUs
    this process may use, at most 4 (more does not help a memory-bound loop)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return min(4, int(env))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@functools.cache
def executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edsft-fl")


def split_range(n: int, ways: int, min_part: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges: `ways` of them, fewer when a part would hold < min_part items."""
    ways = max(1, min(ways, n // max(1, min_part)))
    edges = np.linspace(0, n, ways + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def alloc(shape, dtype) -> np.ndarray:
    """Uninitialised array whose pages are mapped up front (Linux MAP_POPULATE) when it is large.

    First-touch page faults dominate filling a fresh n x n matrix on virtual machines (measured here:
    800 MB took 1.7 s touched page by page, 0.3 s populated in one call). Elsewhere: plain np.empty.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes < (64 << 20) or not flags:
        return np.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)  # the array keeps the mapping alive


def _rows_per_chunk(width: int, elems: int = _CHUNK_ELEMS) -> int:
    return max(1, min(1 << 16, elems // max(1, width)))


def as_f32(X) -> np.ndarray:
    return np.ascontiguousarray(X, dtype=np.float32)


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Unit-norm rows (zero rows stay zero: their cosine similarity to anything is 0)."""
    X = as_f32(X)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64)).astype(np.float32)
    norms[norms == 0] = 1.0
    return X / norms[:, None]


def default_gamma(X: np.ndarray) -> float:
    """1 / mean squared distance between two pool rows = 1 / (2 * total variance). Exact, O(n d)."""
    return PoolGamma().of(X, None, None)


@dataclass(frozen=True)
class PoolGamma(PoolStatistic):
    """`default_gamma` of the whole pool from per-block moments: (count, mean, M2) per embedding
    dimension in float64, merged with Chan et al.'s parallel update, so a sharded pool gets the gamma of
    the whole pool (on one block this is numpy's own var, bit for bit)."""

    def partial(self, X, S, T):
        x = np.asarray(X, dtype=np.float64)
        mean = x.mean(axis=0)
        return len(x), mean, ((x - mean) ** 2).sum(axis=0)

    def merge(self, a, b):
        na, ma, m2a = a
        nb, mb, m2b = b
        n = na + nb
        delta = mb - ma
        return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)

    def value(self, partial) -> float:
        n, _, m2 = partial
        total_var = float((m2 / n).sum()) if n > 1 else 0.0
        return 1.0 / (2.0 * total_var) if total_var > 0 else 1.0


def prepare(X: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows ready for dot products, squared norms or None). Cosine normalises once up front."""
    if metric == "cosine":
        return normalize_rows(X), None
    X = as_f32(X)
    return X, np.einsum("ij,ij->i", X, X).astype(np.float32)


def _sq_dist(A: np.ndarray, a_sq: np.ndarray, B: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    # |a-b|^2 = |a|^2 - 2ab + |b|^2, clipped at 0 against cancellation error.
    D = A @ B.T
    D *= -2.0
    D += a_sq[:, None]
    D += b_sq[None, :]
    np.maximum(D, 0.0, out=D)
    return D


def sim_block(A, a_sq, B, b_sq, metric: str, gamma: float | None) -> np.ndarray:
    """Similarity block (len(A), len(B)) float32 of PREPARED rows (see `prepare`)."""
    if metric == "cosine":
        S = A @ B.T
        np.maximum(S, 0.0, out=S)
        return S
    D = _sq_dist(A, a_sq, B, b_sq)
    D *= -gamma
    np.exp(D, out=D)
    return D


def dist_block(A, a_sq, B, b_sq, metric: str) -> np.ndarray:
    """Distance block: cosine distance 1 - cos (clipped at 0), or SQUARED euclidean distance."""
    if metric == "cosine":
        D = A @ B.T
        np.subtract(1.0, D, out=D)
        np.maximum(D, 0.0, out=D)
        return D
    return _sq_dist(A, a_sq, B, b_sq)


def quantize(S: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float similarity in [0, 1] -> int16 fixed point floor(sim * 32767) (see module docstring).

    One fused pass: the product is cast straight into the int16 output (truncation == floor for
    non-negative values); negative cosines become negative ints and are clipped to 0 after. Similarities
    never exceed 1 by more than float32 rounding, so sim * 32767 cannot overflow int16.
    """
    if out is None:
        out = np.empty(S.shape, dtype=QDTYPE)
    np.multiply(S, np.float32(QUANT_SCALE), out=out, casting="unsafe")
    np.maximum(out, 0, out=out)
    return out


def best_similarity(X_pool, X_sel, metric: str = "cosine", gamma: float | None = None) -> np.ndarray:
    """Per-row max similarity of pool rows to a chosen set, float64 (n,), computed in chunks.

    The facility-location objective of a set is ``best_similarity(X_pool, X_pool[set]).sum()``, and it is
    a sum over rows, so a distributed run computes it as the sum of this over its shards (same `gamma`!).
    An empty set gives zeros.
    """
    _check_metric(metric, SIM_METRICS)
    n = len(X_pool)
    if len(X_sel) == 0:
        return np.zeros(n, dtype=np.float64)
    if metric == "euclidean":
        if gamma is None:
            raise ValueError(
                "best_similarity(metric='euclidean') needs gamma: pass the pool's default_gamma(X_pool) "
                "so every shard uses the same similarity"
            )
    elif metric == "rbf" and gamma is None:
        raise ValueError("best_similarity(metric='rbf') needs gamma=<float>, e.g. default_gamma(X_pool)")
    A, a_sq = prepare(X_pool, metric)
    B, b_sq = prepare(X_sel, metric)
    out = np.empty(n, dtype=np.float64)
    step = _rows_per_chunk(len(B))
    for s in range(0, n, step):
        blk = sim_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], B, b_sq, metric, gamma)
        out[s : s + step] = blk.max(axis=1)
    return out


def min_distance(X_pool, X_sel, metric: str = "euclidean") -> np.ndarray:
    """Per-row distance (cosine distance or euclidean, NOT squared) to the nearest chosen row, float64."""
    _check_metric(metric, DIST_METRICS)
    n = len(X_pool)
    if len(X_sel) == 0:
        return np.full(n, np.inf)
    A, a_sq = prepare(X_pool, metric)
    B, b_sq = prepare(X_sel, metric)
    out = np.empty(n, dtype=np.float64)
    step = _rows_per_chunk(len(B))
    for s in range(0, n, step):
        blk = dist_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], B, b_sq, metric)
        out[s : s + step] = blk.min(axis=1)
    return np.sqrt(out) if metric == "euclidean" else out


def dense_similarity(X, metric: str = "cosine", gamma: float | None = None, width: int | None = None) -> np.ndarray:
    """Quantised n x n similarity (int16, exactly symmetric, diagonal = 1.0).

    `width` >= n returns (n, width) instead, zero in columns n and up, so a caller can view the rows as
    equal fixed-size blocks (see facility.DenseGraph).

    Built in row blocks of the upper triangle and mirrored in cache-sized tiles, so K[i, j] == K[j, i]
    bit for bit (BLAS rounding would otherwise make the two halves differ in the last place) and the
    GEMM does half the work. One float32 block buffer is reused: page faults are not free.
    """
    A, a_sq = prepare(X, metric)
    n = len(A)
    width = n if width is None else int(width)
    if width < n:
        raise ValueError(f"width={width} must be >= the number of rows ({n})")
    padded = alloc((n, width), QDTYPE)
    padded[:, n:] = 0
    K = padded[:, :n]
    step = max(64, min(1024, _rows_per_chunk(n)))
    buf = alloc((min(n, step) * n,), np.float32)
    ways = n_threads()
    for s in range(0, n, step):
        e, m = min(n, s + step), n - s
        S = buf[: (e - s) * m].reshape(e - s, m)
        if metric == "cosine":
            np.matmul(A[s:e], A[s:].T, out=S)
        else:
            S[...] = sim_block(A[s:e], a_sq[s:e], A[s:], a_sq[s:], metric, gamma)
        Q = K[s:e, s:]
        # quantising and mirroring are memory-bound numpy passes that release the GIL: threads help a little
        parallel(ways, e - s, lambda a, b, S=S, Q=Q: quantize(S[a:b], out=Q[a:b]))  # in place: no int16 temporary
        diag = Q[:, : e - s]
        np.maximum(diag, diag.T.copy(), out=diag)
        cols = range(e - s, m, 1024)

        def mirror(a, b, cols=cols, Q=Q, s=s, e=e):
            for c0 in cols[a:b]:
                K[s + c0 : s + c0 + 1024, s:e] = Q[:, c0 : c0 + 1024].T

        parallel(ways, len(cols), mirror)
    np.fill_diagonal(K, QUANT_MAX)
    return padded


def parallel(ways: int, n: int, fn) -> None:
    """fn(start, end) over `ways` contiguous slices of range(n), in threads when there is more than one."""
    parts = split_range(n, ways, min_part=1)
    if len(parts) == 1:
        fn(0, n)
    else:
        list(executor(len(parts)).map(lambda p: fn(*p), parts))


def _topk_rows(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column positions and values of the k largest entries per row (ties: arbitrary but deterministic).

    The k-NN graph's hot spot: selecting from the top end (kth = m - k) is ~3x faster than argpartition
    of -S at k - 1 (measured, no negated copy either), and row chunks run in threads (the GIL is released).
    """
    m = S.shape[1]
    if k >= m:
        idx = np.broadcast_to(np.arange(m), S.shape).copy()
        return idx, S
    idx = np.empty((len(S), k), dtype=np.intp)

    def part(a, b):
        idx[a:b] = np.argpartition(S[a:b], m - k, axis=1)[:, m - k :]

    parallel(n_threads(), len(S), part)
    return idx, np.take_along_axis(S, idx, axis=1)


def knn_graph(
    X,
    n_neighbors: int = 50,
    metric: str = "cosine",
    gamma: float | None = None,
    *,
    exact_max_n: int = 20_000,
    n_probe: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> sp.csr_matrix:
    """Sparse k-nearest-neighbour similarity graph, CSR int16 quantised, row i = pool row, column j = neighbour.

    Every row keeps its `n_neighbors` most similar rows (itself included, similarity 1.0). Exact (chunked
    brute force) up to `exact_max_n` rows; above it an inverted-file approximation: seeded k-means on a
    sample gives ~sqrt(n) cells, and the rows of a cell search the `n_probe` cells nearest to its centroid.
    Memory is O(n * n_neighbors) plus one chunk. The exact graph costs O(n^2 d): at 25k rows it took ~10x
    longer than the approximation (measured), and below 20k rows facility location uses the dense matrix.
    """
    _check_metric(metric, SIM_METRICS)
    A, a_sq = prepare(X, metric)
    n = len(A)
    k = int(min(n_neighbors, n))
    cols = np.empty((n, k), dtype=np.int32)
    vals = np.empty((n, k), dtype=QDTYPE)
    if n <= exact_max_n:
        step = _rows_per_chunk(n)
        for s in _progress(range(0, n, step), progress, "knn"):
            blk = sim_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], A, a_sq, metric, gamma)
            blk[np.arange(len(blk)), np.arange(s, s + len(blk))] = 2.0  # self first, always kept
            idx, v = _topk_rows(blk, k)
            cols[s : s + step], vals[s : s + step] = idx, quantize(np.minimum(v, 1.0))
    else:
        _ivf_knn(A, a_sq, metric, gamma, k, n_probe, seed, cols, vals, progress)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    G = sp.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(n, n))
    G.sort_indices()
    return G


def _kmeans(A: np.ndarray, n_cells: int, seed: int):
    """Seeded Lloyd k-means on a sample of prepared rows: (centroids, assign(P) -> nearest centroid)."""
    n = len(A)
    rng = np.random.default_rng(seed)
    sample = A[np.sort(rng.choice(n, size=min(n, 40 * n_cells), replace=False))]
    cent = sample[np.sort(rng.choice(len(sample), size=n_cells, replace=False))].copy()

    def assign(P):
        # nearest centroid by euclidean distance on prepared rows (cosine rows are unit norm)
        c_sq = np.einsum("ij,ij->i", cent, cent)
        out = np.empty(len(P), dtype=np.int64)
        step = _rows_per_chunk(n_cells)
        for s in range(0, len(P), step):
            out[s : s + step] = (c_sq[None, :] - 2.0 * (P[s : s + step] @ cent.T)).argmin(axis=1)
        return out

    for _ in range(6):  # a few Lloyd iterations on the sample are plenty for bucketing
        lab = assign(sample)
        sums = np.zeros_like(cent)
        np.add.at(sums, lab, sample)
        cnt = np.bincount(lab, minlength=n_cells)
        nz = cnt > 0
        cent[nz] = sums[nz] / cnt[nz, None]
    return cent, assign


def cell_labels(A: np.ndarray, n_cells: int, seed: int = 0) -> np.ndarray:
    """(Seeded, approximate) k-means cell of every PREPARED row (see `prepare`)."""
    n_cells = max(1, min(n_cells, len(A)))
    if n_cells == 1:
        return np.zeros(len(A), dtype=np.int64)
    _, assign = _kmeans(A, n_cells, seed)
    return assign(A)


def cluster_order(X, metric: str, n_cells: int, seed: int = 0) -> np.ndarray:
    """A permutation of the rows that puts rows of the same (seeded, approximate) k-means cell together."""
    A, _ = prepare(X, metric)
    return np.argsort(cell_labels(A, n_cells, seed), kind="stable")


def _ivf_knn(A, a_sq, metric, gamma, k, n_probe, seed, cols, vals, progress) -> None:
    n = len(A)
    n_cells = max(2, int(math.sqrt(n)))
    cent, assign = _kmeans(A, n_cells, seed)
    lab = assign(A)
    order = np.argsort(lab, kind="stable")
    starts = np.searchsorted(lab[order], np.arange(n_cells + 1))
    c_sq = np.einsum("ij,ij->i", cent, cent)
    near = np.argsort(c_sq[None, :] - 2.0 * (cent @ cent.T), axis=1)[:, : max(1, n_probe)]
    for c in _progress(range(n_cells), progress, "knn-ivf"):
        q = order[starts[c] : starts[c + 1]]
        if len(q) == 0:
            continue
        cand = np.concatenate([order[starts[p] : starts[p + 1]] for p in near[c]])
        if len(cand) < k:  # tiny probe set: widen to everything (rare, small n only)
            cand = np.arange(n)
        Bc, bc_sq = A[cand], None if a_sq is None else a_sq[cand]
        step = _rows_per_chunk(len(cand))
        for s in range(0, len(q), step):
            qs = q[s : s + step]
            blk = sim_block(A[qs], None if a_sq is None else a_sq[qs], Bc, bc_sq, metric, gamma)
            blk[cand[None, :] == qs[:, None]] = 2.0  # self first
            idx, v = _topk_rows(blk, k)
            cols[qs], vals[qs] = cand[idx], quantize(np.minimum(v, 1.0))


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the selection core
        return it
    return tqdm(it, desc=desc, leave=False)


def _check_metric(metric: str, allowed: tuple[str, ...]) -> None:
    if metric not in allowed:
        raise ValueError(f"metric={metric!r} is not supported here: use one of {list(allowed)}")
