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
from edsft.scoring.scorer import Scorer, _exact_top_logits
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
    # bf16 decoder (its Linear weights prepacked for oneDNN), the head's top logits recomputed in fp32
    assert _exact_top_logits in bf16.model.get_output_embeddings()._forward_hooks.values()
    assert any(type(m).__name__ == "_PackedLinear" for m in bf16.model.modules())
    for c in SCORE_COLUMNS:
        rho_all = spearmanr(a[c], b[c]).statistic
        rho_same = spearmanr(a[c][same], b[c][same]).statistic
        # min_margin (the smallest top-1 minus top-2 probability over the answer) is made of near-ties,
        # the most fragile score: on Intel AMX it measured 0.87 with bf16 logits, 0.95 with an fp32
        # head. The head's top logits are now recomputed in fp32: the same numbers as an fp32 head (32
        # prompts, AMD EPYC, every score equal to 3 decimals). With the shared template prefix
        # prefilled once (edsft.models.SharedPrefix) the decoder's bf16 rounding differs from the
        # plain batched prefill's, and the near-ties land elsewhere: over 32 prompts, AMD EPYC,
        # min_margin 0.926 (agreeing rows) / 0.924 (all) against 0.985 / 0.959 without it, while the
        # other scores improved over all rows (0.994 against 0.972-0.978) and 28 answers of 32 agreed
        # with fp32 against 25. Neither bf16 path is closer to fp32 (mean |logit error| 0.079 against
        # 0.083). min_margin is held to 0.92 here, the other five to the 0.95 (README: rank by
        # min_margin in fp32).
        floor = 0.92 if c == "min_margin" else 0.95
        assert rho_same >= floor, (c, rho_same)
        # measured over all rows, AMD EPYC / Intel AMX + fp32 head: 0.97/0.997, 0.997/1.0, 0.88-0.89/0.997,
        # 0.95/0.994, 0.96/0.994, 0.98/0.95 (column order of SCORE_COLUMNS)
        assert rho_all >= (0.85 if c == "least_confidence" else floor), (c, rho_all)
    # the prompt embedding comes from the prefill alone: no generation drift, cosine >= 0.999 per row
    cos = (a["embedding"] * b["embedding"]).sum(1)
    assert cos.min() >= 0.999, cos.min()  # measured 0.99991
