"""Bad input fails early with a UserError (a ValueError) that names the problem and the fix."""

import subprocess
import sys

import numpy as np
import pytest
from selection_data import blobs, score_table

from edsft.errors import UserError
from edsft.selection import SELECTORS, objective, select

X, _ = blobs(50, 4)
S = score_table(50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="nope", budget=3, embeddings=X), r"unknown selector 'nope': valid names are \[.*facility_location"),
        (dict(name="k_center", budget=0, embeddings=X), "budget=0 must be >= 1"),
        (dict(name="k_center", budget=2.5, embeddings=X), "must be an integer"),
        (dict(name="k_center", budget=51, embeddings=X), "allow_budget_over_pool=True"),
        (dict(name="k_center", budget=3, embeddings=X, bogus=1), r"no parameter\(s\) \['bogus'\].*'metric'"),
        (dict(name="k_center", budget=3, embeddings=X, metric="manhattan"), "metric='manhattan' is not valid"),
        (dict(name="facility_location", budget=3, embeddings=X, optimizer="greedy"), "optimizer='greedy'"),
        (dict(name="facility_location", budget=3, embeddings=X, lambda_=1.0), "needs score="),
        (dict(name="facility_location", budget=3, embeddings=X, metric="cosine", gamma=1.0), "gamma is only used"),
        (dict(name="k_center", budget=3, embeddings=None), "needs embeddings"),
        (dict(name="uncertainty", budget=3, scores=S, score="missing"), r"'missing' is missing: available columns are \["),
        (dict(name="uncertainty", budget=3, scores=None), "needs scores"),
        (dict(name="k_center", budget=3, embeddings=X, seed=-1), "seed=-1"),
        (dict(name="k_center", budget=3, embeddings=X, scores={"a": np.zeros(49)}), "disagree on the pool size"),
        (dict(name="task_balanced", budget=3, embeddings=X, scores=S, tasks=np.zeros(40)), "disagree on the pool size"),
        (dict(name="greedi", budget=3, embeddings=X, inner="random"), "has no objective"),
        (dict(name="greedi", budget=3, embeddings=X, m=0), "m=0"),
    ],
)
def test_value_errors(kwargs, match):
    with pytest.raises(UserError, match=match):  # a ValueError, and the CLI's "bad input" (exit 2)
        select(**kwargs)


def test_non_finite_inputs():
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN or inf in 1 row"):
        select("facility_location", 3, embeddings=bad)
    s = dict(S, mean_entropy=S["mean_entropy"].copy())
    s["mean_entropy"][0] = np.inf
    with pytest.raises(UserError, match="'mean_entropy' has 1 NaN/inf"):
        select("uncertainty", 3, scores=s)
    with pytest.raises(UserError, match="2-d"):
        select("k_center", 3, embeddings=np.zeros(50, dtype=np.float32))


def test_objective_rejects_out_of_range_indices():
    with pytest.raises(UserError, match=r"positions in \[0, 50\)"):
        objective("facility_location", [0, 50], embeddings=X)


def test_every_selector_lists_its_params_on_a_typo():
    for name, cls in SELECTORS.items():
        with pytest.raises(UserError, match=f"selector '{name}' has no parameter"):
            cls.from_params(not_a_param=1)


def test_selection_imports_neither_torch_nor_ray():
    code = (
        "import edsft.selection, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pandas')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
