import numpy as np
import pytest
from selection_data import blobs, score_table


@pytest.fixture
def pool():
    X, lab = blobs(300, 8, seed=3)
    return X, score_table(300, 3), np.array(["a", "b", "c"])[lab % 3]
