"""The evaluate stage's result as a type: what the sweep puts in a results row and the report reads.

``metrics.json`` (written by :func:`edsft.training.evaluation.build_metrics`) holds one block per
model variant, ``{"base": {loss, perplexity, exact_match, rouge_l, ..., "macro": {...}},
"finetuned": {...} | None, "per_task": ..., "n": ...}``. :class:`EvalResult` reads exactly that
layout; every consumer goes through it instead of digging in the JSON. Standard library only (the
config layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METRICS", "EvalResult", "headline_metrics"]

# The headline metrics of a model on the eval split; base-model columns of a sweep's results carry
# a ``base_`` prefix.
METRICS = ("exact_match", "rouge_l", "loss")


def _number(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x):
        return float(x)
    return None


def headline_metrics(block: Mapping | None) -> dict[str, float]:
    """The METRICS of one variant block: the macro average (every task family counts the same,
    as in the task-balanced eval split) where there is one, else the overall (row-weighted) value."""
    if not block:
        return {}
    macro = block.get("macro") or {}
    out = {}
    for m in METRICS:
        v = _number(macro.get(m))
        v = v if v is not None else _number(block.get(m))
        if v is not None:
            out[m] = v
    return out


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: the headline metrics per variant (empty when the variant was not evaluated)."""

    n: int = 0
    finetuned: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_metrics(cls, metrics: Mapping) -> EvalResult:
        """From the dict that ``metrics.json`` holds."""
        return cls(
            n=int(metrics.get("n") or 0),
            finetuned=headline_metrics(metrics.get("finetuned")),
            base=headline_metrics(metrics.get("base")),
        )

    @classmethod
    def read(cls, store) -> EvalResult:
        """From a ``metrics.json`` :class:`edsft.storage.Store`."""
        return cls.from_metrics(store.read_json())

    def flat(self) -> dict[str, float]:
        """``{exact_match, rouge_l, loss, base_exact_match, ...}``: the columns of a results row."""
        return {**self.finetuned, **{f"base_{k}": v for k, v in self.base.items()}}
