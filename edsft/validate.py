"""Config rules that need what sits above the config layer: the selector registry and the report's metrics.

``edsft.config`` checks every field's type, bounds and allowed values, but it imports nothing of the
project (so that it stays a millisecond, torch- and numpy-free check). Whether ``selection.name``
names a registered selector, whether ``selection.params`` / ``sweep.params`` build it, whether every
``sweep.selectors`` entry exists and ``sweep.metric`` is a metric the report draws is decided here,
against :data:`edsft.selection.SELECTORS` and :data:`edsft.report.METRICS` themselves, so the lists
are never copied. :func:`check_config` runs before any stage: a typo fails in milliseconds, with the
field, the value and the fix, instead of after ingest and scoring.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from .config import Config, ConfigError, did_you_mean
from .errors import UserError
from .report import METRICS
from .selection import SELECTORS, get_selector

__all__ = ["check_config", "config_problems", "param_grid", "sweep_metrics", "MAP_REDUCE_PARAMS"]

# Keys of selection.params that steer the map-reduce (candidates per shard), not a selector; only
# greedi, which runs the same two rounds in-process, also takes it as its own parameter.
MAP_REDUCE_PARAMS = ("kappa",)


def sweep_metrics() -> tuple[str, ...]:
    """What ``sweep.metric`` may name: a finetuned-model metric or its ``base_`` twin (result columns)."""
    return (*METRICS, *(f"base_{m}" for m in METRICS))


def param_grid(selector: str, spec: Any) -> list[dict]:
    """``{param: value or [values]}`` -> every combination, in sorted key order (one empty dict
    when the selector has no swept parameters). UserError names the bad ``sweep.params`` entry."""
    if spec is None:
        return [{}]
    if not isinstance(spec, Mapping):
        raise UserError(
            f"sweep.params.{selector}={spec!r} must map parameter names to a value or a list of values, "
            f"e.g. sweep.params={{{selector}: {{lambda_: [0.3, 0.7]}}}}"
        )
    keys = sorted(spec)
    values = []
    for k in keys:
        v = list(spec[k]) if isinstance(spec[k], (list, tuple)) else [spec[k]]
        if not v:
            raise UserError(f"sweep.params.{selector}.{k}=[] is empty: give a value or a non-empty list of values")
        values.append(v)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _selector_problem(name_field: str, params_field: str, name: str, params: Mapping[str, Any]) -> str | None:
    """Why selector ``name`` cannot be built with ``params`` (None when it can)."""
    if name not in SELECTORS:
        return f"{name_field}={name!r} is not a selector: {did_you_mean(name, SELECTORS, 'selector')}"
    params = dict(params)
    for key in MAP_REDUCE_PARAMS:
        value = params.get(key) if name == "greedi" else params.pop(key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{params_field}.{key}={value!r} must be an integer >= 1 (candidates per shard)"
    try:
        get_selector(name, **params)  # each selector checks its own parameters when it is built
    except (ValueError, TypeError) as e:
        return f"{params_field}={params!r} does not fit selector {name!r}: {e}"
    return None


def config_problems(cfg: Config) -> list[str]:
    """Every registry-dependent problem of a config that ``edsft.config`` already accepted."""
    sel, sweep = cfg.selection, cfg.sweep
    selection_bad = _selector_problem("selection.name", "selection.params", sel.name, sel.params)
    problems = [selection_bad] if selection_bad else []
    for name in dict.fromkeys(("random", *sweep.selectors)):  # the sweep always adds random
        if name not in SELECTORS:
            problems.append(
                f"sweep.selectors contains {name!r}, which is not a selector: {did_you_mean(name, SELECTORS, 'selector')}"
            )
            continue
        try:
            grid = param_grid(name, sweep.params.get(name))
        except ValueError as e:
            problems.append(str(e))
            continue
        # A trial of the configured selector starts from selection.params, as the sweep runs it
        # (bad selection.params are reported once, above).
        base = dict(sel.params) if name == sel.name and not selection_bad else {}
        for params in grid:
            bad = _selector_problem("sweep.selectors", f"sweep.params.{name}", name, {**base, **params})
            if bad:  # one line per selector: the first combination that fails shows the fix
                problems.append(bad)
                break
    for name in sweep.params:
        if name not in SELECTORS:
            problems.append(f"sweep.params names {name!r}, which is not a selector: {did_you_mean(name, SELECTORS, 'selector')}")
    # Each round picks at least one row: R rounds need a budget of R or more. Random runs one round
    # only (edsft.distributed.sweep.expand_grid), so a sweep of random alone has nothing to check.
    if any(name != "random" for name in sweep.selectors):
        small = [b for b in sweep.budgets if b < max(sweep.rounds)]
        too_many = [r for r in sweep.rounds if r > min(sweep.budgets)]
        if too_many:
            problems.append(
                f"sweep.rounds={list(sweep.rounds)} has {too_many} rounds but sweep.budgets has {small}: each round picks "
                f">= 1 row, so every budget must be >= the largest round count; drop those round counts or raise the budgets"
            )
    if sel.rounds > 1 and cfg.annotation.mode == "export":
        problems.append(
            f"selection.rounds={sel.rounds} with annotation.mode='export': every round but the last trains on its "
            "annotated batch, so it needs the labels at once; use annotation.mode=oracle or import, or selection.rounds=1"
        )
    if sel.rounds > 1 and sel.round_training == "continue" and not cfg.training.lora:
        problems.append(
            "selection.round_training='continue' continues the last round's LoRA adapter: set training.lora=true, "
            "or selection.round_training=restart"
        )
    if sweep.metric not in sweep_metrics():
        problems.append(
            f"sweep.metric={sweep.metric!r} is not a metric of the report: "
            f"{did_you_mean(sweep.metric, sweep_metrics(), 'metric')}"
        )
    return problems


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every registry-dependent problem of ``cfg`` (run before any stage)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
