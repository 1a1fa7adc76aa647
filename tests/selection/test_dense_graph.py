"""The dense facility-location graph's fast paths: clustered row order, block skipping, the lazy pool.

Each fast path must give exactly the numbers of the plain one (integer gains), so every test compares
against the plain DenseGraph or a brute-force sum.
"""

import numpy as np
import pytest
from selection_data import blobs

from edsft.selection import dense_similarity
from edsft.selection.facility import DENSE_BLOCK, DenseGraph, build_graph, facility_location_greedy
from edsft.selection.similarity import alloc, n_threads, quantize


def _graphs(n=3000, d=16, seed=0, metric="cosine", gamma=None):
    X, _ = blobs(n, d, k=12, seed=seed)
    fast = build_graph(X, metric, gamma, dense_max_n=10**9, n_neighbors=10, seed=seed)
    plain = DenseGraph(dense_similarity(X, metric, gamma))
    return X, fast, plain


def _count_block_calls(graph, monkeypatch):
    calls = []
    orig = graph._block_gains

    def wrapped(*a):
        calls.append(len(a[0]))
        return orig(*a)

    monkeypatch.setattr(graph, "_block_gains", wrapped)
    return calls


def test_clustered_blocks_are_set_up_and_padded():
    _, fast, plain = _graphs()
    assert fast.K3 is not None and plain.K3 is None
    assert fast.K3.shape == (3000, -(-3000 // DENSE_BLOCK), DENSE_BLOCK)
    # the padded columns are zero, and the block maxima are the true maxima
    assert not fast.K3.reshape(3000, -1)[:, 3000:].any()
    np.testing.assert_array_equal(fast.M[:, 0], fast.K[:, :DENSE_BLOCK].max(axis=1))


@pytest.mark.parametrize("metric,gamma", [("cosine", None), ("rbf", 0.05)])
def test_block_gains_equal_brute_force(metric, gamma):
    X, fast, plain = _graphs(metric=metric, gamma=gamma)
    rng = np.random.default_rng(0)
    inv = fast.rows(np.arange(len(X)))
    K = fast.K.astype(np.int64)[inv][:, inv]  # the fast graph's own similarity, back in pool order
    assert np.abs(K - plain.K).max() <= 1  # the same similarity up to one quantum (BLAS rounding)
    order = np.argsort(inv)
    for picks in (5, 40, 300):
        chosen = rng.choice(len(X), picks, replace=False)
        c_pool = K[chosen].max(axis=0)  # every row's best similarity, in pool order
        cands = rng.choice(len(X), 200, replace=False)
        want = np.maximum(K[cands] - c_pool, 0).sum(axis=1)
        c_fast = c_pool[order].astype(np.int16)  # the fast graph keeps c in its own row order
        np.testing.assert_array_equal(fast.fresh_gains(cands, c_fast), want)
        # the block path on its own, every block active, and with only the blocks that can gain
        r = fast.rows(cands)
        C3 = _padded(fast, c_fast)
        every = np.ones((len(cands), fast.n_blocks), bool)
        np.testing.assert_array_equal(fast._block_gains(r, C3, every), want)
        np.testing.assert_array_equal(fast._block_gains(r, C3, fast.M[r] > C3.min(axis=1)), want)


def _padded(graph, c):
    out = np.zeros(graph.n_blocks * graph.block, dtype=c.dtype)
    out[: len(c)] = c
    return out.reshape(graph.n_blocks, graph.block)


@pytest.mark.parametrize("seed", range(2))
def test_fast_graph_lazy_equals_naive_and_skips_blocks(seed, monkeypatch):
    X, fast, plain = _graphs(seed=seed)
    calls = _count_block_calls(fast, monkeypatch)
    want = facility_location_greedy(fast, 150, "naive")
    got = facility_location_greedy(fast, 150, "lazy")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert calls, "the lazy greedy never took the block-skipping path on clustered data"
    # and the same optimisation problem as the plain graph, up to the quantum of BLAS rounding
    ref = facility_location_greedy(plain, 150, "lazy")
    assert abs(got[1].sum() - ref[1].sum()) <= 1e-4 * ref[1].sum()


def test_row_order_does_not_depend_on_the_selection_seed():
    X, _ = blobs(1500, 8, k=5, seed=0)
    a = build_graph(X, "cosine", None, 10**9, 10, seed=0)
    b = build_graph(X, "cosine", None, 10**9, 10, seed=7)
    np.testing.assert_array_equal(a.inv, b.inv)


def test_stochastic_on_the_fast_graph_is_seeded_and_close_to_lazy():
    _, fast, _ = _graphs()
    a = facility_location_greedy(fast, 50, "stochastic", seed=3)
    b = facility_location_greedy(fast, 50, "stochastic", seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    lazy = facility_location_greedy(fast, 50, "lazy")
    assert a[1].sum() >= 0.95 * lazy[1].sum()


@pytest.mark.parametrize("pool", [1, 7, 64])
def test_small_lazy_pools_rebuild_and_keep_the_ranking_with_ties(pool):
    # duplicated rows make exact ties everywhere: ties must still go to the lowest index
    X, _ = blobs(300, 5, k=4, seed=1)
    X = np.concatenate([X, X[:150]])
    graph = DenseGraph(dense_similarity(X))
    want = facility_location_greedy(graph, 80, "naive")
    got = facility_location_greedy(graph, 80, "lazy", pool=pool)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_hybrid_bonus_on_the_fast_graph():
    X, fast, plain = _graphs(n=1200)
    mod = np.random.default_rng(0).integers(0, 2000, size=len(X))
    want = facility_location_greedy(plain, 60, "naive", modular=mod)
    got = facility_location_greedy(fast, 60, "lazy", modular=mod)
    np.testing.assert_array_equal(got[0], want[0])


def test_dense_similarity_width_pads_with_zeros():
    X, _ = blobs(50, 4, k=3, seed=0)
    K = dense_similarity(X)
    P = dense_similarity(X, width=64)
    assert P.shape == (50, 64)
    np.testing.assert_array_equal(P[:, :50], K)
    assert not P[:, 50:].any()
    np.testing.assert_array_equal(K, K.T)
    with pytest.raises(ValueError, match="width=10"):
        dense_similarity(X, width=10)


def test_alloc_large_is_a_writable_array():
    a = alloc((9000, 4000), np.int16)  # 72 MB: the populated-mapping path on Linux
    a[:] = 7
    assert a.shape == (9000, 4000) and a.dtype == np.int16 and int(a[-1, -1]) == 7
    b = alloc((3, 3), np.float32)
    assert b.shape == (3, 3)


def test_threads_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert n_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert n_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= n_threads() <= 4


def test_quantize_floors_and_clips():
    S = np.array([[1.0, 0.5, -0.2, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(quantize(S), [[32767, 16383, 0, 0]])
