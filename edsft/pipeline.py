"""The stages in order, each reading and writing artifacts in the run folder ``output.dir``.

    ingest -> pool.parquet/, eval.parquet, quarantine.jsonl
    score  -> scores.parquet/, score_quarantine.jsonl
    select -> selection.parquet
    annotate -> annotated.parquet   (first stage that reads the pool's response column)
    train  -> train/adapter/, train/train_summary.json
    evaluate -> metrics.json
    sweep  -> sweep/results.parquet  (select/annotate/train/evaluate per Tune trial)
    report -> report/report.md, report/*.png

``manifest.json`` records the resolved config, library versions and, per stage, the hash of the
config it ran with, its wall time and its summary. ``run`` skips a stage whose artifact exists with
the same hash (``force=True`` recomputes), so a crashed run picks up where it stopped.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .config import Config, config_hash, config_to_dict
from .pools.sources import open_source
from .storage import Store, get_store, set_default_storage
from .validate import check_config

__all__ = ["Run", "STAGES", "run_stage", "run_pipeline", "StageNotBuilt", "stage_plan"]


class StageNotBuilt(RuntimeError):
    """A stage whose implementation is missing from this install."""


def _log(msg: str) -> None:
    print(f"[edsft] {msg}", file=sys.stderr, flush=True)


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in ("edsft", "ray", "torch", "transformers", "peft", "deepspeed", "pyarrow", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


@dataclass
class Run:
    """The run folder: where every artifact of one config lives (local or s3://)."""

    cfg: Config
    store: Store

    @classmethod
    def open(cls, cfg: Config) -> "Run":
        set_default_storage(cfg.storage.endpoint_url, cfg.storage.region)
        return cls(cfg, get_store(cfg.output.dir, cfg.storage.endpoint_url, cfg.storage.region))

    def path(self, *parts: str) -> Store:
        return self.store.child(*parts)

    # ---- manifest ------------------------------------------------------------------------
    def manifest(self) -> dict:
        m = self.path("manifest.json")
        return m.read_json() if m.exists() else {}

    def record(self, stage: str, entry: dict) -> None:
        m = self.manifest()
        m["edsft"] = library_versions().get("edsft")
        m["versions"] = library_versions()
        m["config"] = config_to_dict(self.cfg)
        m["config_hash"] = config_hash(self.cfg)
        m.setdefault("stages", {})[stage] = entry
        self.path("manifest.json").write_json(m)


# --------------------------------------------------------------------------------------------
# Stage definitions: which config sections each depends on, its artifact, and how to run it.
# --------------------------------------------------------------------------------------------


def _impl(module: str, name: str, stage: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise StageNotBuilt(f"stage {stage!r} is not available in this install ({module}.{name}: {e})") from e


def _ingest(run: Run, progress: bool) -> dict:
    cfg = run.cfg
    source_is_many = open_source(cfg).parallel
    if source_is_many:
        fn = _impl("edsft.distributed.ingest", "ingest_pool_ray", "ingest")
        _ray(cfg)
    else:
        fn = _impl("edsft.pools.ingest", "ingest_pool", "ingest")
    return fn(cfg, run.store, progress=progress)


def _score(run: Run, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.scoring", "score_pool", "score")
    return fn(run.cfg, run.path("pool.parquet"), run.path("scores.parquet"), run.path("score_quarantine.jsonl"), progress=progress)


def _select(run: Run, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.coresets", "select_subset", "select")
    return fn(run.cfg, run.path("scores.parquet"), run.path("selection.parquet"), progress=progress)


def _annotate(run: Run, progress: bool) -> dict:
    from .annotation import annotate

    return annotate(run.cfg, run.path("selection.parquet"), run.path("pool.parquet"), run.path("annotated.parquet"), run.store)


def _train(run: Run, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.train", "train_sft", "train")
    return fn(run.cfg, run.path("annotated.parquet"), run.path("train"), progress=progress)


def _evaluate(run: Run, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.evaluate", "evaluate_models", "evaluate")
    adapter = run.path("train", "adapter")
    return fn(run.cfg, run.path("eval.parquet"), adapter if adapter.exists() else None, run.path("metrics.json"), progress=progress)


def _sweep(run: Run, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.sweep", "run_sweep", "sweep")
    return fn(run.cfg, run.store, progress=progress)


def _report(run: Run, progress: bool) -> dict:
    fn = _impl("edsft.report", "build_report", "report")
    return fn(run.store, metric=run.cfg.sweep.metric)


def _ray(cfg: Config) -> None:
    _impl("edsft.distributed.session", "init_ray", "ray")(cfg)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections whose change invalidates the artifact
    upstream: tuple[str, ...]  # stages whose hash feeds this one
    artifact: str  # path in the run folder that proves the stage finished
    fn: Callable[[Run, bool], dict]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("ingest", ("pool",), (), "pool.parquet", _ingest),
        Stage("score", ("scoring",), ("ingest",), "scores.parquet", _score),
        Stage("select", ("selection",), ("score",), "selection.parquet", _select),
        Stage("annotate", ("annotation",), ("select", "ingest"), "annotated.parquet", _annotate),
        # training.model defaults to scoring.model, so scoring is part of train's identity
        Stage("train", ("training", "scoring"), ("annotate",), "train/adapter", _train),
        Stage("evaluate", ("evaluation",), ("train",), "metrics.json", _evaluate),
        Stage("sweep", ("sweep", "selection", "annotation", "training", "evaluation"), ("score",), "sweep/results.parquet", _sweep),
        Stage("report", (), ("sweep",), "report/report.md", _report),
    ]
}


def stage_plan(cfg: Config) -> list[str]:
    """The stages ``edsft run`` executes for this config, in order."""
    head = ["ingest", "score"]
    if cfg.sweep.enabled:
        return head + ["sweep", "report"]
    if cfg.annotation.mode == "export":
        return head + ["select", "annotate"]
    return head + ["select", "annotate", "train", "evaluate"]


def stage_hash(cfg: Config, name: str) -> str:
    st = STAGES[name]
    return config_hash(cfg, st.sections, extra={u: stage_hash(cfg, u) for u in st.upstream})


def run_stage(cfg: Config, name: str, *, force: bool = False, progress: bool | None = None, skip_done: bool = False) -> dict:
    """Run one stage (always, unless ``skip_done`` and its artifact matches the config hash)."""
    check_config(cfg)  # selector names and params, sweep grid, metric: a typo fails here, not after scoring
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: valid stages are {list(STAGES)}")
    run = Run.open(cfg)
    st = STAGES[name]
    h = stage_hash(cfg, name)
    progress = cfg.output.progress if progress is None else progress
    recorded = run.manifest().get("stages", {})
    done = recorded.get(name, {})
    # An upstream stage that re-ran since (e.g. with --force) makes this artifact stale too.
    inputs = {u: recorded.get(u, {}).get("finished_at") for u in st.upstream}
    if skip_done and not force and done.get("hash") == h and done.get("inputs") == inputs and run.path(st.artifact).exists():
        _log(f"{name}: up to date (config hash {h}), skipped -> {run.path(st.artifact).uri}")
        return {**done, "skipped": True}
    if force and st.name == "train":
        # A forced retrain must not resume the previous run's checkpoints.
        run.path("train").remove()
    t0 = time.time()
    summary = st.fn(run, progress) or {}
    wall = time.time() - t0
    entry = {"hash": h, "inputs": inputs, "wall_s": round(wall, 3), "finished_at": _now(),
             "artifact": run.path(st.artifact).uri, "summary": summary}
    run.record(name, entry)
    _log(f"{name}: {_headline(name, summary)} in {wall:.1f} s -> {run.path(st.artifact).uri}")
    return entry


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _headline(name: str, s: dict) -> str:
    """The one-line summary of a stage."""
    keys = {
        "ingest": ("rows_kept", "rows"),
        "score": ("rows_scored", "rows"),
        "select": ("rows", "rows"),
        "annotate": ("rows", "rows"),
        "train": ("steps", "steps"),
        "evaluate": ("n", "eval rows"),
        "sweep": ("trials", "trials"),
        "report": ("plots", "plots"),
    }
    key, unit = keys[name]
    val = s.get(key)
    if isinstance(val, list):
        val = len(val)
    extra = ""
    if name == "ingest" and "rows_quarantined" in s:
        extra = f", {s['rows_quarantined']} quarantined"
    if name == "score" and "rows_quarantined" in s:
        extra = f", {s['rows_quarantined']} quarantined"
    if name == "select" and "objective" in s:
        extra = f", objective {s['objective']:.4g}" if isinstance(s["objective"], (int, float)) else ""
    return f"{val if val is not None else '?'} {unit}{extra}"


def run_pipeline(cfg: Config, *, force: bool = False, stages: list[str] | None = None) -> dict[str, Any]:
    """All stages of the plan in order, skipping those already done with the same config."""
    results = {}
    for name in stages or stage_plan(cfg):
        results[name] = run_stage(cfg, name, force=force, skip_done=True)
    run = Run.open(cfg)
    if "report" in results:
        _log(f"report: {run.path('report', 'report.md').uri}")
    elif "evaluate" in results:
        _log(f"metrics: {run.path('metrics.json').uri}")
    return results
