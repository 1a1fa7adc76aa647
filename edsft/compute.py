"""Compute accounting: the seconds (and GPU-seconds) a run spent scoring, selecting, training and evaluating.

The one-shot design scores the pool once with the base model; multi-round active learning re-scores
and retrains after every batch. Comparing them needs what each spent, not only the labels, so every
committed stage records its compute in its manifest entry (``entry["compute"]``, written by the
pipeline at commit time from :func:`stage_compute`):

* a stage's result dict (its ``summary``) MAY say how its time splits, ``"compute_s": {kind: s}``
  and ``"gpu_s": {kind: gpu-seconds}`` with kinds in :data:`KINDS` (a multi-round stage scores,
  selects and trains); the wall time it does not account for goes to the stage's own kind;
* otherwise the stage's wall time goes to its declared kind (``edsft.pipeline.Stage.kind``: score ->
  scoring, select -> selection, train -> training, evaluate -> evaluation);
* GPU-seconds are seconds x the GPUs the stage holds (:func:`stage_gpus`): 0 on CPU.

Ingest and annotate have no kind: reading the pool is the same for every design, and annotation
stands for the human labelling that the budget (labels) already counts; their wall time stays in
``wall_s`` and is not compute. A sweep's own entry holds the sum of its trials' compute (plus the
base model's evaluation): what producing its results cost, trials reused from an earlier call
included. Figures are of committed attempts: a resumed stage counts the attempt that committed.

:func:`run_compute` totals a run, following its parent for the stages it inherits (a sweep trial
reads the parent's scores, so its total includes the parent's scoring: one-shot and multi-round are
compared on total spend). Config layer: standard library, the config and a Store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .config import Config, config_to_dict

__all__ = ["KINDS", "stage_gpus", "stage_compute", "entry_compute", "add", "run_compute", "result_columns", "COLUMNS"]

KINDS = ("scoring", "selection", "training", "evaluation")
# Result columns of a sweep (and of result_columns): seconds per kind and in all, then GPU-seconds.
COLUMNS = tuple(f"compute_{k}_s" for k in KINDS) + ("compute_total_s",)
GPU_COLUMNS = tuple(f"gpu_{k}_s" for k in KINDS) + ("gpu_total_s",)

# Manifests written before compute accounting record no compute and no kind: their stages were the
# built-in ones, named as here (a record of the past, not a second place that declares kinds).
_KIND_BEFORE_ACCOUNTING = {"score": "scoring", "select": "selection", "train": "training", "evaluate": "evaluation"}


def _number(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _sections(cfg: Config | Mapping | None) -> Mapping:
    if cfg is None:
        return {}
    return config_to_dict(cfg) if isinstance(cfg, Config) else cfg


def stage_gpus(kind: str | None, cfg: Config | Mapping | None, summary: Mapping | None = None) -> float:
    """The GPUs a stage of ``kind`` holds while it runs, from its config (a Config or the dict a
    manifest records): scoring ``num_actors x num_gpus_per_actor`` (or the actors and per-actor GPUs
    its summary reports on a GPU cluster, where a 0 in the config means one GPU per actor), training
    ``num_workers x`` the per-worker GPU (``resources_per_worker.GPU``, 1 with ``use_gpu``),
    evaluation ``num_actors x num_gpus_per_actor``; selection runs on CPUs. 0 on a CPU cluster."""
    c = _sections(cfg)
    summary = summary or {}
    if kind == "scoring":
        sc = c.get("scoring", {}) or {}
        per = _number(sc.get("num_gpus_per_actor")) or 0.0
        if summary.get("device") == "cuda":  # GPU cluster: the plan took one GPU per actor when 0 was asked
            return (_number(summary.get("actors")) or _number(sc.get("num_actors")) or 1.0) * (per or 1.0)
        return (_number(sc.get("num_actors")) or 1.0) * per
    if kind == "training":
        tr = c.get("training", {}) or {}
        per = (tr.get("resources_per_worker") or {}).get("GPU")
        per = _number(per) if per is not None else (1.0 if tr.get("use_gpu") else 0.0)
        return (_number(tr.get("num_workers")) or 1.0) * (per or 0.0)
    if kind == "evaluation":
        ev = c.get("evaluation", {}) or {}
        return (_number(ev.get("num_actors")) or 1.0) * (_number(ev.get("num_gpus_per_actor")) or 0.0)
    return 0.0


def _kinds_map(x: Any, field: str) -> dict[str, float]:
    """A stage's ``compute_s`` / ``gpu_s``: {kind: seconds >= 0}. A bad one is a bug in the stage."""
    if x is None:
        return {}
    if not isinstance(x, Mapping):
        raise ValueError(f"a stage's summary {field}={x!r} must map kinds {list(KINDS)} to seconds")
    out = {}
    for k, v in x.items():
        s = _number(v)
        if k not in KINDS or s is None or s < 0:
            raise ValueError(f"a stage's summary {field}[{k!r}]={v!r}: kinds are {list(KINDS)}, seconds finite and >= 0")
        out[k] = s
    return out


def stage_compute(kind: str | None, wall_s: float, summary: Mapping | None, cfg: Config | Mapping | None) -> dict:
    """``{"compute_s": {kind: s}, "gpu_s": {kind: gpu-s}}`` of one stage that ran ``wall_s`` seconds.

    The summary's own ``compute_s`` / ``gpu_s`` come first; the wall time left over (when positive)
    goes to ``kind`` (None: not compute, e.g. ingest). Seconds without a GPU figure are multiplied by
    :func:`stage_gpus` of their kind."""
    summary = summary if isinstance(summary, Mapping) else {}
    given = _kinds_map(summary.get("compute_s"), "compute_s")
    given_gpu = _kinds_map(summary.get("gpu_s"), "gpu_s")
    rest = float(wall_s) - sum(given.values())
    parts = [(k, s, given_gpu.get(k)) for k, s in given.items()]
    if kind is not None and rest > 0:
        parts.append((kind, rest, None))
    compute: dict[str, float] = {}
    gpu: dict[str, float] = {}
    for k, s, g in parts:
        compute[k] = compute.get(k, 0.0) + s
        g = s * stage_gpus(k, cfg, summary) if g is None else g
        if g > 0:
            gpu[k] = gpu.get(k, 0.0) + g
    for k, g in given_gpu.items():  # GPU-seconds of a kind the stage gave no seconds for
        if k not in given and g > 0:
            gpu[k] = gpu.get(k, 0.0) + g
    return {"compute_s": _rounded(compute), "gpu_s": _rounded(gpu)}


def _rounded(d: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in d.items()}


def entry_compute(name: str, entry: Mapping, config: Mapping | None = None) -> dict:
    """The compute of a committed manifest entry (``{}``-shaped when it holds none): its recorded
    ``compute``, or for an entry committed before compute accounting its wall time under the
    built-in stage's kind (GPUs from ``config``, the manifest's recorded config)."""
    if entry.get("state", "done") != "done":  # a killed commit: its stage runs again
        return {"compute_s": {}, "gpu_s": {}}
    if isinstance(entry.get("compute"), Mapping):
        c = entry["compute"]
        return {"compute_s": dict(c.get("compute_s") or {}), "gpu_s": dict(c.get("gpu_s") or {})}
    wall = _number(entry.get("wall_s")) or 0.0
    return stage_compute(_KIND_BEFORE_ACCOUNTING.get(name), wall, entry.get("summary"), config)


def add(computes: Iterable[Mapping]) -> dict:
    """The sum of several ``{"compute_s", "gpu_s"}`` dicts, with every kind present and the totals."""
    compute = dict.fromkeys(KINDS, 0.0)
    gpu = dict.fromkeys(KINDS, 0.0)
    for c in computes:
        for k, v in (c.get("compute_s") or {}).items():
            compute[k] = compute.get(k, 0.0) + v
        for k, v in (c.get("gpu_s") or {}).items():
            gpu[k] = gpu.get(k, 0.0) + v
    compute, gpu = _rounded(compute), _rounded(gpu)
    return {
        "compute_s": compute,
        "gpu_s": gpu,
        "total_s": round(sum(compute.values()), 3),
        "gpu_total_s": round(sum(gpu.values()), 3),
    }


def _manifest(run) -> dict:
    m = run.child("manifest.json")
    data = m.read_json() if m.exists() else {}
    return data if isinstance(data, dict) else {}


def run_compute(run, parent=None, inherited: Iterable[str] | None = None) -> dict:
    """A run's compute: its own committed stages plus the stages it inherits from its parent run.

    ``run`` (and ``parent``) are run-folder Stores. A child run's manifest records its parent and the
    stages it inherits (``manifest["parent"]``); ``parent`` (where the parent is now) and
    ``inherited`` are for child runs committed before that record existed. Returns
    ``{"compute_s": {kind: s}, "gpu_s": {kind: gpu-s}, "total_s", "gpu_total_s",
    "stages": {stage: compute}, "inherited": {stage: compute}}`` (every kind present, 0 when none)."""
    m = _manifest(run)
    config = m.get("config")
    stages = {name: entry_compute(name, e, config) for name, e in (m.get("stages") or {}).items()}
    link = m.get("parent") or {}
    names = tuple(link.get("inherited") or inherited or ())
    if parent is None and link.get("run"):
        from .storage import get_store

        parent = get_store(link["run"])
    from_parent = {}
    if parent is not None and names:
        pm = _manifest(parent)
        for name in names:
            e = (pm.get("stages") or {}).get(name)
            if e and name not in stages:
                from_parent[name] = entry_compute(name, e, pm.get("config"))
    total = add([*stages.values(), *from_parent.values()])
    return {**total, "stages": stages, "inherited": from_parent}


def result_columns(compute: Mapping | None) -> dict[str, float | None]:
    """A sweep results row's compute columns (:data:`COLUMNS`, :data:`GPU_COLUMNS`); None without a compute."""
    if not compute:
        return dict.fromkeys(COLUMNS + GPU_COLUMNS)
    out: dict[str, float | None] = {f"compute_{k}_s": float(compute["compute_s"].get(k, 0.0)) for k in KINDS}
    out["compute_total_s"] = float(compute["total_s"])
    out.update({f"gpu_{k}_s": float(compute["gpu_s"].get(k, 0.0)) for k in KINDS})
    out["gpu_total_s"] = float(compute["gpu_total_s"])
    return out
