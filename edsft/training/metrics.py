"""Generation metrics: normalised exact match and ROUGE-L, per task and macro-averaged.

Pure Python on strings, so they are easy to check by hand (tests/training/test_metrics.py).
ROUGE-L is the number papers report: the F-measure of Google's ``rouge-score`` package,
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)
["rougeL"].fmeasure`` - its tokenizer (lowercase, every run of characters outside [a-z0-9]
becomes a space, split) and its LCS F1 (Lin 2004, beta = 1), with no stemming (the scorer's
default). It is re-implemented here in a few lines rather than imported, so that evaluation needs
neither rouge-score nor nltk; tests/training/test_metrics.py checks it against the real library.
Like that library, text in scripts other than Latin letters and digits has no tokens and scores 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["normalize", "exact_match", "rouge_tokens", "rouge_l", "lcs_length", "summarize", "macro_average"]

_WS = re.compile(r"\s+")
# rouge_score/tokenize.py, verbatim: the same patterns give the same tokens
_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_ROUGE_VALID = re.compile(r"^[a-z0-9]+$")
_TRAILING_PUNCT = string.punctuation + "。！？…"


def normalize(text: str) -> str:
    """Lowercase, strip, collapse whitespace, strip trailing punctuation ("Paris." == "paris")."""
    text = _WS.sub(" ", str(text).lower()).strip()
    return text.rstrip(_TRAILING_PUNCT).rstrip()


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence; O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: "Paris, France." -> ["paris", "france"]."""
    # str.lower() first, as rouge-score does: it also folds e.g. the Kelvin sign to "k"
    return [t for t in _WS.split(_ROUGE_NON_ALNUM.sub(" ", str(text).lower())) if _ROUGE_VALID.match(t)]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure exactly as ``rouge-score`` computes it (0 when either side has no token)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = lcs_length(r, p)
    precision, recall = lcs / len(p), lcs / len(r)
    # the same expression as rouge_score.scoring.fmeasure, so the floats agree bit for bit
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def macro_average(per_task: Mapping[str, Mapping[str, float | None]], key: str) -> float | None:
    """Unweighted mean of one metric over tasks (each task counts once, whatever its size)."""
    return _mean(m.get(key) for m in per_task.values())


def summarize(rows: Sequence[Mapping]) -> dict:
    """Aggregate per-row results into overall (micro), per-task and macro metrics.

    Each row has ``task`` and any of: ``loss_sum`` + ``n_tokens`` (teacher-forced response loss),
    ``exact_match``, ``rouge_l``. Loss is token-weighted (sum of token losses / tokens), and
    perplexity is exp(loss); the generation metrics are means over rows.
    """
    by_task: dict[str, list[Mapping]] = defaultdict(list)
    for r in rows:
        by_task[str(r.get("task") or "all")].append(r)

    def agg(group: Sequence[Mapping]) -> dict:
        out: dict = {"n": len(group)}
        tokens = sum(int(r.get("n_tokens") or 0) for r in group)
        if any("loss_sum" in r for r in group):
            loss = sum(float(r.get("loss_sum") or 0.0) for r in group) / tokens if tokens else None
            out["loss"] = loss
            out["perplexity"] = math.exp(min(loss, 50.0)) if loss is not None else None
            out["n_tokens"] = tokens
        for key in ("exact_match", "rouge_l"):
            if any(key in r for r in group):
                out[key] = _mean(r.get(key) for r in group)
        return out

    per_task = {t: agg(g) for t, g in sorted(by_task.items())}
    overall = agg(rows)
    macro = {k: macro_average(per_task, k) for k in ("loss", "perplexity", "exact_match", "rouge_l") if k in overall}
    return {"overall": overall, "macro": macro, "per_task": per_task}
