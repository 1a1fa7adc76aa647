"""SmolLM2-135M-Instruct (the real default model) scoring builtin task prompts with the direct Scorer."""

from __future__ import annotations

import numpy as np
import pytest

from edsft.pools.builtin_tasks import generate_tasks
from edsft.scoring.scorer import Scorer
from edsft.scoring.uncertainty import SCORE_COLUMNS


def _batch(n: int) -> dict:
    rows = generate_tasks(n, seed=3)
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows]
    return {
        "row_id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "prompt": np.array(prompts, dtype=object),
        "task": np.array([r["task"] for r in rows], dtype=object),
    }


@pytest.mark.slow
def test_smollm2_scores_are_finite_normalised_and_deterministic():
    batch = _batch(32)
    a = Scorer("builtin:smollm2-135m", dtype="float32", max_new_tokens=10, batch_size=16, encoder="builtin:minilm")(batch)
    # a second run: a fresh scorer with another micro-batch size (other padding) and the static-cache
    # generation path (width bucketing, filler rows) on the first 12 prompts (to keep the test short)
    # gives the same answers and numbers
    k = 12
    b = Scorer("builtin:smollm2-135m", dtype="float32", max_new_tokens=10, batch_size=5, generation="static")(
        {c: v[:k] for c, v in batch.items()}
    )

    assert all(e is None for e in a["error"])
    for c in SCORE_COLUMNS:
        assert np.isfinite(a[c]).all(), c
        np.testing.assert_allclose(a[c][:k], b[c], atol=1e-4, err_msg=c)
    assert (a["least_confidence"] >= a["least_confidence_norm"] - 1e-6).all()  # 1-p >= 1-p^(1/n)
    assert ((a["min_margin"] >= 0) & (a["min_margin"] <= a["mean_margin"] + 1e-6)).all()
    assert ((a["response_tokens"] >= 1) & (a["response_tokens"] <= 10)).all()
    assert a["generated"][:k].tolist() == b["generated"].tolist()
    assert sum(bool(g.strip()) for g in a["generated"]) >= 28  # the model answers
    assert (a["response_tokens"] < 10).sum() >= 4  # and some answers end the turn on their own
    assert a["embedding"].shape == (32, 576) and a["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a["embedding"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a["embedding"][:k], b["embedding"], atol=1e-4)
    assert a["embedding_encoder"].shape == (32, 384)
    np.testing.assert_allclose(np.linalg.norm(a["embedding_encoder"], axis=1), 1.0, atol=1e-5)
    # prompts of the same task family sit closer together than prompts of different families
    sim = a["embedding"] @ a["embedding"].T
    same = batch["task"][:, None] == batch["task"][None, :]
    off = ~np.eye(32, dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean()
