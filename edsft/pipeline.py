"""The stages in order, each reading and writing artifacts in the run folder ``output.dir``.

    ingest -> pool.parquet/, eval.parquet, quarantine.jsonl
    score  -> scores.parquet/, score_quarantine.jsonl
    round<r> -> rounds/<r>/ (only with selection.rounds = R > 1, r = 1..R: scores.parquet of the rows
              not chosen yet re-scored with round r-1's adapter, selection.parquet of the round's batch,
              annotated.parquet and train/adapter/ for r < R; see edsft.distributed.rounds)
    select -> selection.parquet (the largest budget), selection/b<size>.parquet (a list of budgets),
              subset/ (each size as alpaca, messages and the pool's layout JSONL + dataset_info.json);
              with R > 1 rounds the union of their batches in pick order, with a `round` column
    annotate -> annotated.parquet   (first stage that reads the pool's response column), annotated/
              (the same layouts with responses; export mode: to_annotate.jsonl/.csv, to_annotate/)
    train  -> train/ (adapter/, train_summary.json)
    evaluate -> metrics.json, predictions.jsonl
    sweep  -> sweep/results.parquet  (each Tune trial runs select/annotate/train/evaluate on a
              child run in sweep/trials/<trial>/ whose ingest and score artifacts are this run's)
    report -> report/ (report.md, *.png)

Crash safety. A stage writes into ``_staging/<stage>/`` and nothing else; only when it returns are
its outputs moved into place and its commit recorded in ``manifest.json``. The manifest is the
commit marker, for local folders and ``s3://`` alike (S3 has no rename, so a move there is a copy
that a kill can interrupt): before the move the stage's entry says ``committing``, after it
``done`` with an inventory of what was committed (every file's size, the Parquet row counts).
A stage counts as done only if its entry is ``done``, its config hash and its inputs' commits
are the current ones and the inventory still matches what is on disk, so a killed stage is
never skipped with a partial artifact: ``run`` simply runs it again. A failed stage removes its
staging folder; the resumable stages keep it, so the next attempt continues: train from its last
checkpoint, score from its last committed block. ``manifest.json`` also records the resolved
config and library versions, each stage's compute (:mod:`edsft.compute`: seconds and GPU-seconds
per kind) and, for a child run, its parent and the stages it inherits from it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import compute, console
from .config import Config, config_hash, config_to_dict
from .errors import UserError
from .pools.sources import open_source
from .storage import Store, get_store, set_default_storage
from .validate import check_config

__all__ = [
    "Run",
    "STAGES",
    "run_stage",
    "run_pipeline",
    "summarize",
    "run_trial",
    "trial_run",
    "StageNotBuilt",
    "ManifestError",
    "read_manifest",
    "stage_plan",
    "get_stage",
    "round_stage",
    "round_stages",
    "trial_stages",
]

STAGING = "_staging"


class StageNotBuilt(RuntimeError):
    """A stage whose optional dependency is missing from this install."""


class ManifestError(UserError):
    """``manifest.json`` cannot be read: it says where it is and how to recover."""


def _log(msg: str) -> None:
    console.note(msg)


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
    """The run folder: where every artifact of one config lives (local or s3://).

    A child run (a sweep trial) reads the artifacts of the ``inherited`` stages from ``parent``
    and writes its own stages into its own folder."""

    cfg: Config
    store: Store
    parent: Run | None = None
    inherited: tuple[str, ...] = ()
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, cfg: Config) -> Run:
        set_default_storage(cfg.storage.endpoint_url, cfg.storage.region)
        return cls(cfg, get_store(cfg.output.dir, cfg.storage.endpoint_url, cfg.storage.region))

    def path(self, *parts: str) -> Store:
        return self.store.child(*parts)

    def owner(self, stage: str) -> Run:
        """The run whose folder holds ``stage``'s artifacts."""
        return self.parent if stage in self.inherited and self.parent is not None else self

    def input(self, *parts: str) -> Store:
        """An artifact of an earlier stage (the parent's, for an inherited stage)."""
        return self.owner(producer("/".join(parts))).path(*parts)

    def hash(self, name: str) -> str:
        """The stage's config hash (memoised: the ingest hash lists the pool's files)."""
        if name not in self._hashes:
            st = get_stage(name)
            extra: dict[str, Any] = {u: self.hash(u) for u in st.upstream_for(self.cfg)}
            if name == "ingest":
                fp = _pool_fingerprint(self.cfg)
                if fp is not None:
                    extra["pool_files"] = fp
            self._hashes[name] = config_hash(self.cfg, st.sections, extra=extra)
        return self._hashes[name]

    # ---- manifest ------------------------------------------------------------------------
    def manifest(self) -> dict:
        return read_manifest(self.store)

    def entry(self, stage: str) -> dict:
        """The manifest entry of ``stage`` in the run that owns it ({} when none)."""
        return self.owner(stage).manifest().get("stages", {}).get(stage, {})

    def record(self, stage: str, entry: dict) -> None:
        """Write the stage's entry (one whole-file write: the manifest is never half-written)."""
        m = self.manifest()
        m["edsft"] = library_versions().get("edsft")
        m["versions"] = library_versions()
        m["config"] = config_to_dict(self.cfg)
        m["config_hash"] = config_hash(self.cfg)
        if self.parent is not None:  # where the inherited stages' artifacts (and compute) are
            m["parent"] = {"run": self.parent.store.uri, "inherited": list(self.inherited)}
        m.setdefault("stages", {})[stage] = entry
        self.path("manifest.json").write_json(m)


def read_manifest(run: Store) -> dict:
    """The run folder's ``manifest.json`` ({} when there is none yet)."""
    m = run.child("manifest.json")
    if not m.exists():
        return {}
    try:
        data = m.read_json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{m.uri} is damaged ({type(e).__name__}: {e}); it records which stages of this run finished. "
            f"Move it aside (e.g. rename it to manifest.json.broken) and re-run `edsft run`: with no commit "
            f"recorded, every stage runs again (a single command such as `edsft score` would instead take the "
            f"artifacts it finds as brought from elsewhere)"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise ManifestError(f"{m.uri} is not an edsft manifest (expected an object with 'stages'): move it aside and re-run")
    return data


def _pool_fingerprint(cfg: Config) -> str | None:
    from .pools.fingerprint import fingerprint

    return fingerprint(cfg.pool, cfg.storage.endpoint_url, cfg.storage.region)


# --------------------------------------------------------------------------------------------
# Stage definitions: which config sections each depends on, its outputs, and how to run it.
# Every stage function gets the run (to read inputs with run.input) and its staging folder
# ``out`` (to write its outputs into), and returns its summary.
# --------------------------------------------------------------------------------------------

# Optional third-party packages a stage may need; only their absence is "not available in this
# install". An ImportError from anything else (edsft's own modules included) is a bug and surfaces.
_OPTIONAL = {
    "ray",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "sentence_transformers",
    "matplotlib",
    "pandas",
    "mlflow",
    "tensorboard",
    "wandb",
}


def _impl(module: str, name: str, stage: str) -> Callable:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing in _OPTIONAL:
            raise StageNotBuilt(
                f"stage {stage!r} needs {missing!r}, which is not installed: pip install 'edsft[all]' (or {missing})"
            ) from e
        raise
    return getattr(mod, name)


def _ingest(run: Run, out: Store, progress: bool) -> dict:
    cfg = run.cfg
    if open_source(cfg).parallel:  # many files: one Ray task per file
        fn = _impl("edsft.distributed.ingest", "ingest_pool_ray", "ingest")
        _ray(cfg)
    else:
        fn = _impl("edsft.pools.ingest", "ingest_pool", "ingest")
    return fn(cfg, out, progress=progress)


def _score(run: Run, out: Store, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.scoring", "score_pool", "score")
    return fn(
        run.cfg, run.input("pool.parquet"), out.child("scores.parquet"), out.child("score_quarantine.jsonl"), progress=progress
    )


def _select(run: Run, out: Store, progress: bool) -> dict:
    _ray(run.cfg)
    R = run.cfg.selection.rounds
    if R > 1:  # the rounds picked the batches: selection.parquet is their union, in pick order
        fn = _impl("edsft.distributed.rounds", "union_selection", "select")
        summary = fn(
            run.cfg, [run.input("rounds", str(r), "selection.parquet") for r in range(1, R + 1)], out.child("selection.parquet")
        )
        last = run.entry(round_stage(R)).get("summary", {})
        summary.update(objective=last.get("objective"), rows=run.entry(round_stage(1)).get("summary", {}).get("pool_rows"))
    else:
        fn = _impl("edsft.distributed.coresets", "select_subset", "select")
        summary = fn(run.cfg, run.input("scores.parquet"), out.child("selection.parquet"), progress=progress)
    summary["subset"] = _export_selection(run.cfg, out, run.input("pool.parquet"))
    return summary


def _round(r: int) -> Callable[[Run, Store, bool], dict]:
    """Stage function of round ``r`` of a multi-round selection (edsft.distributed.rounds)."""

    def fn(run: Run, out: Store, progress: bool) -> dict:
        _ray(run.cfg)
        impl = _impl("edsft.distributed.rounds", "run_round", round_stage(r))
        return impl(
            run.cfg,
            r,
            pool=run.input("pool.parquet"),
            scores=run.input("scores.parquet"),
            earlier=[run.input("rounds", str(k), "selection.parquet") for k in range(1, r)],
            annotated=[run.input("rounds", str(k), "annotated.parquet") for k in range(1, r)],
            adapter=run.input("rounds", str(r - 1), "train", "adapter") if r > 1 else None,
            out=out.child("rounds", str(r)),  # the stage's output folder, inside its staging folder
            progress=progress,
        )

    return fn


def _export_selection(cfg: Config, out: Store, pool: Store) -> dict:
    """subset/: every selected size as alpaca, messages and the pool's layout, prompts only (selection
    never reads the label column; annotate writes the same files with responses to annotated/)."""
    from .exports import in_rank_order, pool_fields, pool_rows, write_subsets

    sizes = cfg.selection.budgets if not isinstance(cfg.selection.budget, int) else ()
    files = [out.child("selection.parquet")] + [out.child("selection", f"b{b}.parquet") for b in sizes]
    tables = [f.read_table(columns=["row_id", "rank"]) for f in files if f.exists()]  # capped sizes may merge
    rows = pool_rows({r for t in tables for r in t.column("row_id").to_pylist()}, pool, with_response=False)
    subsets = {f"b{t.num_rows}": in_rank_order(rows, t) for t in tables}
    return write_subsets(out.child("subset"), subsets, cfg.pool.format, pool_fields(cfg.pool))


def _annotate(run: Run, out: Store, progress: bool) -> dict:
    from .annotation import annotate

    return annotate(run.cfg, run.input("selection.parquet"), run.input("pool.parquet"), out.child("annotated.parquet"), out)


def _train(run: Run, out: Store, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.train", "train_sft", "train")
    data, init = run.input("annotated.parquet"), None
    sel = run.cfg.selection
    if sel.rounds > 1 and sel.round_training == "continue":  # the last round's adapter, on the last batch
        last_batch = _impl("edsft.distributed.rounds", "last_batch", "train")
        data = last_batch(data, run.input("rounds", str(sel.rounds), "selection.parquet"), out.child("_last_batch.parquet"))
        init = run.input("rounds", str(sel.rounds - 1), "train", "adapter")
    return fn(run.cfg, data, out.child("train"), progress=progress, init_adapter=init)


def _evaluate(run: Run, out: Store, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.evaluate", "evaluate_models", "evaluate")
    adapter = run.input("train", "adapter")
    return fn(
        run.cfg, run.input("eval.parquet"), adapter if adapter.exists() else None, out.child("metrics.json"), progress=progress
    )


def _sweep(run: Run, out: Store, progress: bool) -> dict:
    _ray(run.cfg)
    fn = _impl("edsft.distributed.sweep", "run_sweep", "sweep")
    return fn(run.cfg, run.store, progress=progress, results=out.child("sweep", "results.parquet"), trial_runner=run_trial)


def _report(run: Run, out: Store, progress: bool) -> dict:
    fn = _impl("edsft.report", "build_report", "report")
    return fn(run.store, metric=run.cfg.sweep.metric, out=out.child("report"))


def _ray(cfg: Config) -> None:
    _impl("edsft.distributed.session", "init_ray", "ray")(cfg)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections whose change invalidates the outputs
    upstream: tuple[str, ...]  # stages whose hash (and commit) feeds this one
    outputs: tuple[str, ...]  # paths in the run folder the stage writes (those it produced are committed)
    fn: Callable[[Run, Store, bool], dict]
    needs: tuple[str, ...] = ()  # upstream artifacts it reads, checked before it starts
    resumable: bool = False  # keep the staging folder across attempts with the same hash
    keep_on_failure: tuple[str, ...] = ()  # diagnostics moved into the run folder even when the stage fails
    # where its wall time goes in the compute accounting (edsft.compute.KINDS), None: not compute
    kind: str | None = None
    # upstream stages that depend on the config (multi-round selection's rounds), after `upstream`
    more_upstream: Callable[[Config], tuple[str, ...]] | None = None

    def __post_init__(self):
        if self.kind is not None and self.kind not in compute.KINDS:
            raise ValueError(
                f"Stage {self.name!r}: kind={self.kind!r} is not one of {list(compute.KINDS)} (or None: not compute)"
            )

    def upstream_for(self, cfg: Config) -> tuple[str, ...]:
        """The stages whose hash and commit feed this one, for this config."""
        return self.upstream + (self.more_upstream(cfg) if self.more_upstream is not None else ())


def _select_upstream(cfg: Config) -> tuple[str, ...]:
    # with R > 1 rounds the last round's commit (and through its hash, every earlier one's) feeds select
    R = cfg.selection.rounds
    return (round_stage(R),) if R > 1 else ()


def _train_upstream(cfg: Config) -> tuple[str, ...]:
    # round_training: continue trains the last batch from round R-1's adapter
    R, how = cfg.selection.rounds, cfg.selection.round_training
    return (round_stage(R - 1),) if R > 1 and how == "continue" else ()


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        # a failed ingest keeps quarantine.jsonl: it says which rows were bad and why
        Stage(
            "ingest",
            ("pool",),
            (),
            ("pool.parquet", "eval.parquet", "quarantine.jsonl"),
            _ingest,
            keep_on_failure=("quarantine.jsonl",),
        ),
        # Score keeps its staging folder too: an attempt with the same hash scores only the rows of no finished block
        Stage(
            "score",
            ("scoring",),
            ("ingest",),
            ("scores.parquet", "score_quarantine.jsonl"),
            _score,
            needs=("pool.parquet",),
            resumable=True,
            kind="scoring",
        ),
        # selection.parquet is the largest budget (what annotate, train and evaluate read); with a list
        # of budgets selection/b<size>.parquet holds each; subset/ the trainer-ready files of each
        # (score's hash covers ingest's, so reading the pool's prompts adds no upstream)
        Stage(
            "select",
            ("selection",),
            ("score",),
            ("selection.parquet", "selection", "subset"),
            _select,
            needs=("scores.parquet", "pool.parquet"),
            kind="selection",
            more_upstream=_select_upstream,
        ),
        Stage(
            "annotate",
            ("annotation",),
            ("select", "ingest"),
            ("annotated.parquet", "to_annotate.jsonl", "to_annotate.csv", "annotated", "to_annotate"),
            _annotate,
            needs=("selection.parquet", "pool.parquet"),
        ),
        # training.model defaults to scoring.model, so scoring is part of train's identity; Ray
        # Train's checkpoints live in the staging folder until the run finishes
        Stage(
            "train",
            ("training", "scoring"),
            ("annotate",),
            ("train",),
            _train,
            needs=("annotated.parquet",),
            resumable=True,
            kind="training",
            more_upstream=_train_upstream,
        ),
        Stage(
            "evaluate",
            ("evaluation",),
            ("train", "ingest"),
            ("metrics.json", "predictions.jsonl"),
            _evaluate,
            needs=("eval.parquet",),
            kind="evaluation",
        ),
        # the trials are child runs with their own manifests (committed stage by stage), and Tune
        # keeps its own experiment state: only the results table is staged
        Stage(
            "sweep",
            ("sweep", "selection", "annotation", "training", "evaluation"),
            ("score", "ingest"),
            ("sweep/results.parquet",),
            _sweep,
            needs=("pool.parquet", "eval.parquet", "scores.parquet"),
        ),
        Stage("report", (), ("sweep",), ("report",), _report, needs=("sweep/results.parquet",)),
    ]
}


_ROUND = re.compile(r"round([1-9][0-9]*)")


def round_stage(r: int) -> str:
    """The name of round ``r``'s stage (``round1``, ``round2``, ...; multi-round selection)."""
    return f"round{r}"


def get_stage(name: str) -> Stage:
    """The stage called ``name``: one of STAGES, or round r of a multi-round selection (``round<r>``).

    Round r re-scores the rows not chosen yet with round r-1's adapter, picks its batch among them and,
    unless it is the last, annotates and finetunes (edsft.distributed.rounds); it depends on the
    selection, annotation and training config, the scores and every earlier round."""
    if name in STAGES:
        return STAGES[name]
    m = _ROUND.fullmatch(name)
    if m is None:
        raise KeyError(name)
    r = int(m.group(1))
    return Stage(
        name,
        ("selection", "annotation", "training"),
        ("score", *(round_stage(k) for k in range(1, r))),
        (f"rounds/{r}",),
        _round(r),
        needs=("scores.parquet", "pool.parquet"),
        resumable=True,  # re-scoring blocks and training checkpoints survive a crash of the round
        # no kind of its own: its summary splits its compute (scoring, selection, training); what is
        # left is the batch's annotation and bookkeeping, not compute (as for the annotate stage)
        kind=None,
    )


def producer(artifact: str) -> str:
    """The stage whose outputs hold ``artifact`` (a path in the run folder)."""
    m = re.match(r"rounds/([1-9][0-9]*)(/|$)", artifact)
    if m:
        return round_stage(int(m.group(1)))
    for st in STAGES.values():
        if any(artifact == o or artifact.startswith(o + "/") for o in st.outputs):
            return st.name
    raise KeyError(f"no stage writes {artifact!r}")


def stage_plan(cfg: Config) -> list[str]:
    """The stages ``edsft run`` executes for this config, in order."""
    head = ["ingest", "score"]
    if cfg.sweep.enabled:
        return head + ["sweep", "report"]
    if cfg.annotation.mode == "export":
        return head + ["select", "annotate"]
    return head + round_stages(cfg) + ["select", "annotate", "train", "evaluate"]


def round_stages(cfg: Config) -> list[str]:
    """The stages of a multi-round selection, in order (none for the one-shot design, rounds = 1)."""
    R = cfg.selection.rounds
    return [round_stage(r) for r in range(1, R + 1)] if R > 1 else []


def stage_hash(cfg: Config, name: str) -> str:
    return Run.open(cfg).hash(name)


# --------------------------------------------------------------------------------------------
# Commit bookkeeping
# --------------------------------------------------------------------------------------------


def _inputs(run: Run, st: Stage) -> dict[str, str | None]:
    """Which commit of each upstream stage this one read: an upstream stage that re-ran since
    (e.g. with --force) makes this stage stale too."""
    return {u: run.entry(u).get("finished_at") for u in st.upstream_for(run.cfg)}


def why_not_done(run: Run, name: str) -> str | None:
    """None when ``name`` is committed for the current config and its outputs are intact on
    disk; else the reason it must run."""
    st = get_stage(name)
    owner = run.owner(name)
    e = run.entry(name)
    if not e:
        return "never ran"
    if e.get("state") != "done" or "inventory" not in e:
        return "its last attempt did not commit"
    if e.get("hash") != run.hash(name):
        return "the config or the input files changed"
    if e.get("inputs") != _inputs(owner, st):
        return "an upstream stage re-ran since"
    for o, recorded in e["inventory"].items():
        found = owner.path(o).inventory()
        if found != recorded:
            return _describe_change(owner.path(o).uri, recorded, found)
    return None


def _describe_change(uri: str, recorded: dict | None, found: dict | None) -> str:
    if found is None:
        return f"{uri} is missing"
    if recorded is None:
        return f"{uri} appeared after the commit"
    if recorded.get("rows") != found.get("rows"):
        return f"{uri} holds {found.get('rows')} rows, the commit recorded {recorded.get('rows')}"
    return f"{uri} changed on disk since the commit"


def _check_upstream(run: Run, st: Stage) -> None:
    """Refuse to read an upstream artifact whose stage did not commit (a killed or failed run) or
    that was built with another config. An upstream stage without any manifest entry is allowed:
    its artifacts were brought from elsewhere (e.g. a hand-made results table for ``report``)."""
    for need in st.needs:
        if not run.input(need).exists():
            raise UserError(
                f"stage {st.name!r} needs {run.input(need).uri}, which does not exist: run `edsft {producer(need)}` "
                f"first (or `edsft run`, which runs every stage that is missing)"
            )
        # A file an earlier commit left behind is not this commit's: e.g. annotated.parquet from an
        # oracle run stays on disk after `annotate annotation.mode=export` (which writes to_annotate.*
        # and must not delete what annotators may be filling in), and training must not take it.
        prod = producer(need)
        e = run.entry(prod)
        if e.get("state") == "done" and "inventory" in e:
            owner = next((o for o in e["inventory"] if need == o or need.startswith(o + "/")), None)
            if owner is None:
                raise UserError(
                    f"stage {st.name!r} needs {run.input(need).uri}, but the {prod!r} stage's last commit did not "
                    f"produce it (that file is left from an earlier commit): "
                    + (
                        "annotation.mode=export writes to_annotate.* for annotators; fill them in and run "
                        "`edsft annotate annotation.mode=import annotation.annotations_path=...`"
                        if prod == "annotate"
                        else f"run `edsft {prod}` with a config that writes it"
                    )
                )
    for u in st.upstream_for(run.cfg):
        if not run.entry(u):
            continue
        why = why_not_done(run, u)
        if why is not None:
            where = "" if run.owner(u) is run else f" in {run.owner(u).store.uri}"
            raise UserError(
                f"stage {st.name!r} needs the {u!r} stage's outputs{where}, which are not usable ({why}): "
                f"run `edsft {u}` (or `edsft run`, which runs what is missing) first"
            )


def _rebase(obj: Any, old: str, new: str) -> Any:
    """Point the paths in a summary (or message) from the staging folder at the committed place."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebase(v, old, new) for v in obj)
    return obj


def _execute(run: Run, st: Stage, progress: bool, force: bool) -> dict:
    """Run the stage in its staging folder, then commit its outputs."""
    staging = run.path(STAGING, st.name)
    h = run.hash(st.name)
    marker = staging.child("_attempt.json")
    keep = st.resumable and not force and marker.exists() and marker.read_json().get("hash") == h
    if not keep:
        staging.remove()  # leftovers of a killed attempt, or of another config
    marker.write_json({"hash": h, "started_at": _now()})
    inputs = _inputs(run, st)
    t0 = time.time()
    try:
        summary = st.fn(run, staging, progress) or {}
    except BaseException as e:  # KeyboardInterrupt too: never leave a half-written stage behind
        for o in st.keep_on_failure:
            if staging.child(o).exists():
                staging.child(o).move_to(run.path(o))
        if not st.resumable:
            _remove_staging(run, staging)
        e.args = tuple(_rebase(a, staging.uri, run.store.uri) for a in e.args)
        raise
    wall = time.time() - t0
    produced = [o for o in st.outputs if staging.child(o).exists()]
    entry = {
        "hash": h,
        "inputs": inputs,
        "wall_s": round(wall, 3),
        "finished_at": _now(),
        "artifact": run.path(produced[0] if produced else st.outputs[0]).uri,
        "summary": _rebase(summary, staging.uri, run.store.uri),
        # seconds (and GPU-seconds) per kind: the summary's own split, else the wall time under st.kind
        "compute": compute.stage_compute(st.kind, wall, summary, run.cfg),
    }
    # The commit: say so first, move, then record what is on disk. A kill anywhere in between
    # leaves "committing", which is never taken for done.
    run.record(st.name, {**entry, "state": "committing"})
    for o in produced:
        staging.child(o).move_to(run.path(o))
    run.record(st.name, {**entry, "state": "done", "inventory": {o: run.path(o).inventory() for o in produced}})
    _remove_staging(run, staging)
    return entry


def _remove_staging(run: Run, staging: Store) -> None:
    staging.remove()
    if not run.path(STAGING).list():  # the last stage in staging: leave no empty folder behind
        run.path(STAGING).remove()


def run_stage(cfg: Config, name: str, *, force: bool = False, progress: bool | None = None, skip_done: bool = False) -> dict:
    """Run one stage (always, unless ``skip_done`` and it is committed for this config)."""
    check_config(cfg)  # selector names and params, sweep grid, metric: a typo fails here, not after scoring
    try:
        get_stage(name)
    except KeyError:
        raise UserError(f"unknown stage {name!r}: valid stages are {list(STAGES)}") from None
    run = Run.open(cfg)
    if name == "select":  # a multi-round selection: the rounds that did not commit run first
        for r in round_stages(cfg):
            if why_not_done(run, r) is not None:  # `edsft run` ran them already: no line for them here
                _run(run, r, progress=progress)
    return _run(run, name, force=force, progress=progress, skip_done=skip_done)


def _run(run: Run, name: str, *, force: bool = False, progress: bool | None = None, skip_done: bool = False) -> dict:
    st = get_stage(name)
    progress = run.cfg.output.progress if progress is None else progress
    con = console.active()
    if con is not None and not con.verbose:
        progress = False  # the stages' own bars would only clutter the log: the console shows progress
    if skip_done and not force:
        why = why_not_done(run, name)
        if why is None:
            done = run.entry(name)
            _log(f"{name}: up to date (config hash {done['hash']}), skipped -> {done.get('artifact')}")
            return {**done, "skipped": True}
        if run.entry(name):
            _log(f"{name}: runs again: {why}")
    _check_upstream(run, st)
    t0 = time.time()
    started = f"running (config hash {run.hash(name)})"
    if con is not None:
        con.stage_started(name, started)  # its progress line updates until the stage ends
    else:
        _log(f"{name}: {started}")
        console.stage(name)  # a sweep trial's progress sink (edsft.distributed.sweep) hears of it
    if force and st.name == "train":
        run.path("train").remove()  # a forced retrain must not resume the previous run's checkpoints
    try:
        entry = _execute(run, st, progress, force)
    except BaseException as e:
        if con is not None:
            con.stage_finished(f"{name}: failed after {console.format_seconds(time.time() - t0)}: {type(e).__name__}")
        raise
    done = f"{name}: {_headline(name, entry['summary'])} in {entry['wall_s']:.1f} s -> {entry['artifact']}"
    if con is not None:
        con.stage_finished(done)
    else:
        _log(done)
    return entry


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _headline(name: str, s: dict) -> str:
    """The one-line summary of a stage."""
    extra = ""
    if name in ("ingest", "score") and "rows_quarantined" in s:
        extra = f", {s['rows_quarantined']} quarantined"
    if name == "score" and isinstance(s.get("rows_per_s"), (int, float)):
        extra += f", {s['rows_per_s']:.3g} rows/s"
    if name == "select":
        extra = f" of {s['rows']}" if "rows" in s else ""
        extra += f", objective {s['objective']:.4g}" if isinstance(s.get("objective"), (int, float)) else ""
    if _ROUND.fullmatch(name):
        extra = f" of {s['pool_rows']}" if "pool_rows" in s else ""
        if isinstance(s.get("rescored"), dict):
            extra += f", {s['rescored'].get('rows_scored')} rows re-scored"
        if isinstance(s.get("train"), dict):
            extra += f", trained {s['train'].get('steps')} steps on {s['train'].get('examples')} rows"
    if name == "evaluate" and isinstance(s.get("delta"), dict):
        extra = "".join(f", {m} {s['delta'][m]:+.3g}" for m in ("rouge_l", "loss") if isinstance(s["delta"].get(m), (int, float)))
        extra = extra and f" (finetuned - base{extra})"
    return _count(name, s) + extra


def _count(name: str, s: dict) -> str:
    """What a stage produced, counted: ``200 rows``, ``6 steps``, ``8 trials``."""
    keys = {
        "ingest": ("rows_kept", "rows"),
        "score": ("rows_scored", "rows"),
        "select": ("budget", "rows"),
        "annotate": ("rows", "rows"),
        "train": ("steps", "steps"),
        "evaluate": ("n", "eval rows"),
        "sweep": ("trials", "trials"),
        "report": ("plots", "plots"),
    }
    # a round reports the rows it picked; a stage added by a user its summary's "rows" (or nothing)
    key, unit = keys.get(name, ("picked", "rows") if _ROUND.fullmatch(name) else ("rows", "rows"))
    val = s.get(key)
    if isinstance(val, list):
        val = len(val)
    return f"{val if val is not None else '?'} {unit}"


def run_pipeline(cfg: Config, *, force: bool = False, stages: list[str] | None = None, summary: bool = True) -> dict[str, Any]:
    """All stages of the plan in order, skipping those already committed with the same config;
    then (``summary``) a table of them on the console."""
    results = {}
    for name in stages or stage_plan(cfg):
        results[name] = run_stage(cfg, name, force=force, skip_done=True)
    if summary:
        summarize(cfg, results)
    return results


def summarize(cfg: Config, results: dict[str, dict]) -> None:
    """The end of a run on the console: a table of the stages, then where to look."""
    run = Run.open(cfg)
    rows = [{"stage": name, "rows": _count(name, e.get("summary", {})), **e} for name, e in results.items()]
    lines = ["", *console.summary_table(rows)]
    if "report" in results:
        lines.append(f"report:  {run.path('report', 'report.md').uri}")
    elif "sweep" in results:
        lines.append(f"report:  edsft report {run.store.uri}")
    if "evaluate" in results:
        lines.append(f"metrics: {run.path('metrics.json').uri}")
    lines.append(console.compute_line(compute.run_compute(run.store)))
    con = console.active()
    if con is not None:
        lines.append(f"log:     {con.log_path}")
        for line in lines:
            con.line(line)
    else:
        print("\n".join(lines), file=sys.stderr, flush=True)


# The stages a sweep trial runs itself; the rest it inherits from the sweep's run.
TRIAL_STAGES = ("select", "annotate", "train", "evaluate")


def trial_run(cfg: Config, parent_uri: str) -> Run:
    """The child run of a sweep trial: its own folder ``cfg.output.dir``, with the pool, scores and
    eval split of the parent run ``parent_uri`` (what :func:`run_trial` runs and what it skips)."""
    child = Run.open(cfg)
    parent = Run(cfg, get_store(parent_uri, cfg.storage.endpoint_url, cfg.storage.region))
    return Run(cfg, child.store, parent=parent, inherited=("ingest", "score"))


def trial_stages(cfg: Config) -> tuple[str, ...]:
    """What a trial with this config runs: its rounds (selection.rounds > 1), then TRIAL_STAGES."""
    return (*round_stages(cfg), *TRIAL_STAGES)


def run_trial(cfg: Config, parent_uri: str) -> dict[str, dict]:
    """One sweep trial: the pipeline's own select -> annotate -> train -> evaluate on the child run
    ``cfg.output.dir``, whose pool, scores and eval split are the parent run's (``parent_uri``);
    with ``selection.rounds`` > 1 its rounds first (``trial_stages``), each re-scoring on Ray Data
    from inside the trial.

    Stages the child already committed for this config are skipped, so a trial that finished
    under another grid (or was killed half-way) is reused or continued. Returns {stage: entry}."""
    child = trial_run(cfg, parent_uri)
    return {name: _run(child, name, skip_done=True, progress=False) for name in trial_stages(cfg)}
