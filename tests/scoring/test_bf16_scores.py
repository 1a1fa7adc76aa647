"""Quality guard for bf16 scoring (scoring.dtype: auto on CPUs with native bf16): SmolLM2-135M
scores the same prompts in bf16 and fp32; the rankings a selector sees and the embeddings agree.

Greedy generation can take another token at a near tie in bf16 (measured: 3 of 16 answers differ
after a few tokens), and then the two runs score different answers. Scores that average over the
answer (entropies, margins, the length-normalised confidence) are robust to that; the raw
least_confidence = 1 - p(answer) is not (it tracks the answer's length): measured Spearman 0.89
over all 16 rows, 0.95+ over the rows whose answers agree. Both are asserted below.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from edsft.pools.builtin_tasks import generate_tasks
from edsft.scoring.scorer import Scorer
from edsft.scoring.uncertainty import SCORE_COLUMNS

pytestmark = pytest.mark.slow

N = 16


def _batch() -> dict:
    rows = generate_tasks(N, seed=5)
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows]
    return {
        "row_id": np.array([f"r{i}" for i in range(N)], dtype=object),
        "prompt": np.array(prompts, dtype=object),
        "task": np.array([r["task"] for r in rows], dtype=object),
    }


def test_bf16_scores_rank_like_fp32_and_embeddings_agree():
    batch = _batch()
    fp32 = Scorer("builtin:smollm2-135m", dtype="float32", max_new_tokens=12, batch_size=N)
    bf16 = Scorer("builtin:smollm2-135m", dtype="bfloat16", max_new_tokens=12, batch_size=N)
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    a, b = fp32(batch), bf16(batch)
    for c in SCORE_COLUMNS:  # fp32 outputs whatever the model ran in
        assert b[c].dtype == np.float32 and np.isfinite(b[c]).all(), c
    same = np.array([x == y for x, y in zip(a["generated"], b["generated"])])
    assert same.sum() >= 0.75 * N, list(zip(a["generated"], b["generated"]))  # measured 12-13 (AMD), 16 (AMX) of 16
    assert type(bf16.model.get_output_embeddings()).__name__ == "_Float32Head"  # bf16 decoder, fp32 logits
    for c in SCORE_COLUMNS:
        rho_all = spearmanr(a[c], b[c]).statistic
        rho_same = spearmanr(a[c][same], b[c][same]).statistic
        # min_margin (the smallest top-1 minus top-2 probability over the answer) is made of near-ties,
        # the most fragile score: on Intel AMX it measured 0.87 with bf16 logits, 0.95 with the fp32
        # head (0.953 on the 26 agreeing rows of 32, 0.92 over all 32); AMD EPYC: 0.98. It is held to
        # 0.93 here, the other five to the 0.95 (README: rank by min_margin in fp32).
        floor = 0.93 if c == "min_margin" else 0.95
        assert rho_same >= floor, (c, rho_same)
        # measured over all rows, AMD EPYC / Intel AMX + fp32 head: 0.97/0.997, 0.997/1.0, 0.88-0.89/0.997,
        # 0.95/0.994, 0.96/0.994, 0.98/0.95 (column order of SCORE_COLUMNS)
        assert rho_all >= (0.85 if c == "least_confidence" else floor), (c, rho_all)
    # the prompt embedding comes from the prefill alone: no generation drift, cosine >= 0.999 per row
    cos = (a["embedding"] * b["embedding"]).sum(1)
    assert cos.min() >= 0.999, cos.min()  # measured 0.99991
