"""random and uncertainty: seeding, direction per score column, tie-breaking."""

import numpy as np
import pytest

from edsft.selection import HIGHER_IS_UNCERTAIN, select


def test_random_is_seeded_numpy_choice():
    res = select("random", 5, scores={"s": np.zeros(50)}, seed=3)
    expected = np.random.default_rng(3).choice(50, size=5, replace=False)
    np.testing.assert_array_equal(res.indices, expected)
    assert np.isnan(res.gains).all() and np.isnan(res.objective)


@pytest.mark.parametrize("score", sorted(HIGHER_IS_UNCERTAIN))
def test_direction_per_score(score):
    values = np.array([0.5, 0.9, 0.1, 0.7, 0.3])
    res = select("uncertainty", 2, scores={score: values}, score=score)
    if score in ("mean_margin", "min_margin"):  # small margin = uncertain
        assert res.indices.tolist() == [2, 4]
        np.testing.assert_allclose(res.gains, [-0.1, -0.3])
    else:  # entropy / least confidence: large = uncertain
        assert res.indices.tolist() == [1, 3]
        np.testing.assert_allclose(res.gains, [0.9, 0.7])
    assert res.objective == pytest.approx(res.gains.sum())


def test_unknown_column_defaults_to_larger_is_uncertain_and_can_flip():
    S = {"my_score": np.array([1.0, 3.0, 2.0])}
    assert select("uncertainty", 1, scores=S, score="my_score").indices.tolist() == [1]
    assert select("uncertainty", 1, scores=S, score="my_score", higher_is_uncertain=False).indices.tolist() == [0]


def test_ties_go_to_lowest_index_unless_jitter():
    S = {"mean_entropy": np.array([0.2, 0.5, 0.5, 0.5, 0.1])}
    assert select("uncertainty", 2, scores=S).indices.tolist() == [1, 2]
    picks = {tuple(select("uncertainty", 2, scores=S, jitter=True, seed=s).indices) for s in range(20)}
    assert len(picks) > 1 and all(set(p) <= {1, 2, 3} for p in picks)
