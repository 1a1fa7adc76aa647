"""Ray Tune sweep over selector x budget x seed (x selector hyperparameters x round counts).

The pool is scored once (``run/scores.parquet``); every trial then runs the pipeline's own

    select -> annotate -> train (Ray Train, launched from inside the trial) -> evaluate

stages (``trial_runner``, :func:`edsft.pipeline.run_trial`) on a child run in
``run/sweep/trials/<selector>[-params][-r<rounds>]-b<budget>-s<seed>/`` whose pool, scores and eval
split are the run's, and reports the eval metrics (:class:`edsft.results.EvalResult`) to Tune. Ray 2.60 runs Train V2, where ``Tuner(TorchTrainer)`` is not supported: the trial is a
*function* trainable that only drives its TorchTrainer, so it asks for a sliver of a CPU
(``sweep.cpus_per_trial``) and the trainer's workers hold the real resources; with
``training.mode: local`` (auto's choice for one CPU worker) the trial trains in its own process
and reserves the worker's resources itself, so it is placed like the worker would be. Concurrency is
capped by ``max_concurrent_trials`` (from the cluster when null) so that trials do not start
trainers the cluster cannot place.

Restarts: re-running a sweep builds its grid afresh (Tune's own restore is never used: it unpickles
its state from the run folder, which may be shared); every trial is invoked again, and a finished
one returns at once (below). Tune's folder ``run/sweep/tune/<name>-<attempt>`` is a log of one
attempt. A trial's child run commits stage by stage like any run, so a trial that finished under a
different grid (one more budget, say) is not recomputed, and a killed one continues. Its
``result.json`` (its results row, keyed by the trial's config hash and the hashes of the pool and
scores it read) is written last; a trial whose result.json matches both is reused as it stands,
without its stage artifacts (so results brought from another machine, or a folder whose adapters
were pruned, are not recomputed).
Results: ``run/sweep/results.parquet``, one row per trial, with its compute (:mod:`edsft.compute`:
seconds per kind, the parent's scoring included, and GPU-seconds when there are any).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from .. import compute, console
from ..config import Config, config_from_dict, config_hash, config_to_dict
from ..errors import UserError
from ..results import METRICS, EvalResult
from ..storage import Store, get_store
from ..validate import param_grid

__all__ = [
    "run_sweep",
    "collect_results",
    "expand_grid",
    "trial_name",
    "default_max_concurrent_trials",
    "check_trial_fits",
    "finished_result",
    "trial_hash",
    "trial_config",
    "parent_commits",
    "RESULT_COLUMNS",
]

RESULT_COLUMNS = (
    ["trial_id", "selector", "params", "budget", "seed", "rounds"]
    + list(METRICS)
    + [f"base_{m}" for m in METRICS]
    + ["objective", "train_steps", "wall_s"]
    + list(compute.COLUMNS)
    + list(compute.GPU_COLUMNS)  # left out of a table where no trial used a GPU
    + ["status", "error", "metrics"]
)
# The stages a trial inherits from the sweep's run (edsft.pipeline.run_trial); a trial's manifest
# records them itself, this is for trials committed before it did.
_INHERITED = ("ingest", "score")
# Config sections that decide a trial's result (sweep itself only decides which trials exist).
_TRIAL_SECTIONS = ("pool", "scoring", "selection", "annotation", "training", "evaluation")


def _log(msg: str) -> None:
    console.note(f"sweep: {msg}")


# A running trial's progress: written by the trial (ProgressFile), read by the driver (_trial_progress)
PROGRESS_FILE = "progress.json"


class ProgressFile:
    """A console sink (:func:`edsft.console.set_sink`) for a trial's process: the stage it runs and
    how far it is (``{"stage", "done", "total", "unit", "stage_started", "time"}``) in the trial
    folder's ``progress.json``, rewritten whole (atomically) at most every ``every`` seconds and at
    each stage start, so a long trial (an hour of LoRA steps on a CPU) is not silent until it ends."""

    def __init__(self, target: Store, every: float = 10.0):
        self.target, self.every = target, every
        self.stage, self.started, self.written = None, time.time(), 0.0

    def __call__(self, stage: str | None, done: float | None, total: float | None, unit: str) -> None:
        now = time.time()
        if stage != self.stage:
            self.stage, self.started, self.written = stage, now, 0.0
        if now - self.written < self.every and done is not None:
            return
        self.written = now
        rec = {"stage": stage, "done": done, "total": total, "unit": unit, "stage_started": self.started, "time": now}
        try:
            self.target.write_json(rec)
        except Exception:  # noqa: BLE001 - progress is for a person; the trial must not fail over it
            pass


def trial_progress_text(name: str, rec: dict | None, now: float | None = None) -> str:
    """``random-b4096-s0 train 340/1024 steps, ETA 25m`` from a trial's progress.json (or just the
    name while it has none yet)."""
    if not rec or not rec.get("stage"):
        return name
    text = f"{name} {rec['stage']}"
    done, total = rec.get("done"), rec.get("total")
    if done is None:
        return text
    text += f" {done:g}/{total:g} {rec.get('unit', '')}" if total else f" {done:g} {rec.get('unit', '')}"
    elapsed = (rec.get("time") or 0) - (rec.get("stage_started") or 0)
    if total and 0 < done < total and elapsed > 0:
        # from the trial's last write: what is left at its rate so far, less the time since it wrote
        left = elapsed / done * (total - done) - max(0.0, (now or time.time()) - rec["time"])
        text += f", ETA {console.format_seconds(max(left, 0.0))}"
    return text.rstrip()


def _trial_progress(total: int, run: Store, every: float | None = None):
    """A Tune callback (it runs in the driver) that puts ``trials done / total`` on the console, with
    what each running trial is doing (its progress.json); without a console (library use, the
    benchmarks) a line with the same every ``every`` seconds (default: the console's interval, at
    least a minute)."""
    from ray.tune import Callback

    interval = float(os.environ.get("EDSFT_PROGRESS_INTERVAL", 30)) if every is None else every

    class TrialProgress(Callback):
        def __init__(self):
            self.done, self.polled, self.noted, self.detail = 0, 0.0, time.time(), ""

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ARG002 - Tune's signature
            self.done += 1
            name = ((trial.config or {}).get("trial") or {}).get("name")
            # the other running trials stay on the line until the next poll
            self.detail = "; ".join(p for p in self.detail.split("; ") if p and p.split(" ")[0] != name)
            console.progress(self.done, total, "trials", detail=self.detail)

        on_trial_error = on_trial_complete

        def on_step_end(self, iteration, trials, **info):  # noqa: ARG002 - Tune's signature (after each loop step)
            now = time.time()
            if now - self.polled < min(interval, 10.0):
                return
            self.polled = now
            running = [t.config["trial"]["name"] for t in trials if t.status == "RUNNING" and "trial" in (t.config or {})]
            parts = []
            for name in sorted(running):
                f = run.child("sweep", "trials", name, PROGRESS_FILE)
                try:
                    rec = f.read_json() if f.exists() else None
                except (OSError, ValueError):  # being replaced, or a store hiccup: next time
                    rec = None
                parts.append(trial_progress_text(name, rec, now))
            self.detail = detail = "; ".join(parts)
            if console.active() is not None:
                console.progress(self.done, total, "trials", detail=detail)
            elif parts and now - self.noted >= max(interval, 60.0):
                self.noted = now
                _log(f"{self.done}/{total} trials done; running: {detail}")

    return TrialProgress()


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def trial_name(selector: str, params: dict, budget: int, seed: int, rounds: int = 1) -> str:
    """``<selector>[-k=v,...][-r<rounds>]-b<budget>-s<seed>``, safe as a folder name locally and on S3.
    One round (the one-shot design) adds nothing: sweeps from before ``sweep.rounds`` keep their names."""
    name = selector
    if params:
        name += "-" + ",".join(f"{k}={params[k]}" for k in sorted(params))
    if rounds != 1:
        name += f"-r{rounds}"
    name += f"-b{budget}-s{seed}"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def expand_grid(cfg: Config) -> tuple[list[dict], list[str]]:
    """Every trial of the sweep, in a stable order, and notes for the log.

    ``random`` is always part of the grid: the label-efficiency ratio is measured against it. Each
    variant runs at every round count of ``sweep.rounds`` except random, which never reads the model:
    with R > 1 rounds it would be the same design as one round, so it runs one-shot only (noted)."""
    notes = []
    selectors = list(dict.fromkeys(cfg.sweep.selectors))  # drop duplicates, keep order
    if not selectors:
        raise UserError("sweep.selectors=[] is empty: name at least one selector, e.g. [random, facility_location]")
    if "random" not in selectors:
        selectors.insert(0, "random")
        notes.append("sweep.selectors has no 'random': added it (the label-efficiency ratio is measured against random)")
    from ..selection import SELECTORS

    unknown = [s for s in cfg.sweep.params if s not in SELECTORS]
    if unknown:
        raise UserError(f"sweep.params names selectors {unknown} that do not exist: valid names are {sorted(SELECTORS)}")
    # Params of known selectors this sweep does not run are ignored, not an error: a config's
    # sweep.params (the quickstart's included) may hold settings for more selectors than one sweep
    # picks, e.g. `edsft sweep sweep.selectors=[random,k_center]`.
    unused = [s for s in cfg.sweep.params if s not in selectors]
    if unused:
        notes.append(f"sweep.params for {unused} ignored: not in sweep.selectors={selectors}")
    rounds = [int(r) for r in dict.fromkeys(cfg.sweep.rounds)]
    multi = [r for r in rounds if r != 1]
    if multi:
        notes.append(
            f"sweep.rounds={rounds}: random runs with one round only (it never reads the model, so {multi} rounds "
            "would repeat the same design)"
        )
    if cfg.selection.rounds != 1 and cfg.selection.rounds not in rounds:
        notes.append(
            f"selection.rounds={cfg.selection.rounds} is not used by the sweep: trials take their round count from "
            f"sweep.rounds={rounds}"
        )
    if cfg.selection.round_budgets is not None:
        notes.append(
            f"selection.round_budgets={list(cfg.selection.round_budgets)} is not used by the sweep: each trial splits "
            "its budget evenly over its rounds"
        )
    variants = []  # (selector, params, rounds)
    for selector in selectors:
        base = dict(cfg.selection.params) if selector == cfg.selection.name else {}
        for params in param_grid(selector, cfg.sweep.params.get(selector)):
            # random at one round, whatever sweep.rounds holds (with rounds=[2] it still runs: it is the anchor)
            for r in [1] if selector == "random" else rounds:
                variants.append((selector, {**base, **params}, r))
    # Seed-major, then budget, then selector: Tune starts trials in this order, so a sweep that is
    # stopped early (or read while running) has every selector at the same budgets, comparable.
    # Random's extra budgets (sweep.random_budgets, usually beyond the others: the longest trials)
    # start each seed: longest first packs the concurrent trials better, and the shared budgets still
    # follow one another, so a sweep stopped early still has every selector at the same budgets.
    cells = [(b, [v for v in variants if v[0] == "random"]) for b in cfg.sweep.random_budgets]
    cells += [(b, variants) for b in cfg.sweep.budgets]
    specs = []
    for seed in cfg.sweep.seeds:
        for budget, cell in cells:
            for selector, params, r in cell:
                specs.append(
                    {
                        "name": trial_name(selector, params, int(budget), int(seed), r),
                        "selector": selector,
                        "params": params,
                        "budget": int(budget),
                        "seed": int(seed),
                        "rounds": r,
                    }
                )
    names = [s["name"] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(
            f"sweep trials {dup} appear twice: remove duplicate budgets/seeds from sweep.budgets / sweep.random_budgets / sweep.seeds"
        )
    return specs, notes


def trial_config(cfg: Config, spec: dict, trial: Store) -> Config:
    """The config one trial runs with: its selector/params/budget/seed/rounds, its own output folder
    (Ray Train checkpoints go to the trial's train/ unless training.storage_path is set; run names
    hash the data, so concurrent trials never collide) and the seed also for training (LoRA init
    and data order are part of what a seed replicates)."""
    return cfg.replace(
        **{
            "selection.name": spec["selector"],
            "selection.params": dict(spec["params"]),
            "selection.budget": spec["budget"],
            "selection.seed": spec["seed"],
            # a spec from before sweep.rounds has no "rounds": one round
            "selection.rounds": int(spec.get("rounds", 1)),
            "selection.round_budgets": None,  # the trial's budget, split evenly
            "training.seed": spec["seed"],
            "evaluation.base_model": False,  # the base model is evaluated once for the whole sweep
            "output.dir": trial.uri,
            "output.progress": False,
        }
    )


def trial_hash(cfg: Config) -> str:
    data = config_to_dict(cfg)
    # Where a trial writes, how it retries and whether it trains in-process or in a Ray Train worker
    # group (training.mode: same result, tests/training/test_train_local.py) do not change what it
    # computes: a finished trial is reused across them.
    data["training"] = {
        k: v for k, v in data["training"].items() if k not in ("storage_path", "max_failures", "log_every", "mode")
    }
    return config_hash({s: data[s] for s in _TRIAL_SECTIONS})


def _experiment_name(cfg: Config, specs: list[dict]) -> str:
    """The grid's name (its trial configs and trial names hashed): one attempt's Tune folder is ``<name>-<attempt>``."""
    data = config_to_dict(cfg)
    return "sweep-" + config_hash({s: data[s] for s in _TRIAL_SECTIONS}, extra=[s["name"] for s in specs])


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


def _local(cfg: Config) -> bool:
    return cfg.training.resolved_mode == "local"


def _trial_needs(cfg: Config) -> dict[str, float]:
    """What one running trial holds: its own CPU sliver plus its trainer's workers, or, when it
    trains in its own process (training.mode local), the one worker's resources."""
    per = dict(cfg.training.resources_per_worker)
    per.setdefault("CPU", 1.0)  # Ray Train's default worker asks for one CPU
    if cfg.training.use_gpu:
        per.setdefault("GPU", 1.0)
    need = {res: amount * cfg.training.num_workers for res, amount in per.items() if amount > 0}
    if _local(cfg):
        need["CPU"] = max(need.get("CPU", 0.0), cfg.sweep.cpus_per_trial)
    else:
        need["CPU"] = need.get("CPU", 0.0) + cfg.sweep.cpus_per_trial
    return need


def _on_own_resources(cfg: Config) -> Config:
    """The config a trial's stages run with. A trial that trains in-process holds its worker's CPUs
    itself (_trial_resources); its evaluation actors then run on those CPUs, idle while the trial
    waits for them, and ask the cluster for none: asking for more waits forever when trials fill it
    (two trials x 0.95 CPU on 2 CPUs, each evaluation actor pending on 0.5 CPU: Ray Data's 30-minute
    no-progress timeout). Resources only: what the trial computes, and its trial_hash, stay as they
    are. (Scoring is not touched: its config is part of the inherited score stage's hash.)"""
    if not _local(cfg):
        return cfg
    return cfg.replace(**{"evaluation.cpus_per_actor": 0.0})


def _trial_resources(cfg: Config) -> dict[str, float]:
    """What Tune reserves for the trial process: a sliver when it drives a Ray Train worker group
    (the workers hold the real resources), everything when it trains in-process (training.mode local),
    so that Tune places it where the worker would have gone."""
    return _trial_needs(cfg) if _local(cfg) else {"CPU": cfg.sweep.cpus_per_trial}


def check_trial_fits(cfg: Config, cluster: dict[str, float]) -> None:
    """A trial whose trainer cannot be placed next to the trial itself waits forever: refuse it.

    E.g. 2 workers x 1 CPU on a 2-CPU cluster: the trial's own 0.001 CPU leaves 1.999."""
    for res, need in _trial_needs(cfg).items():
        have = cluster.get(res, 0.0)
        if need > have + 1e-9:
            workers = cfg.training.num_workers
            sliver = cfg.sweep.cpus_per_trial if res == "CPU" and not _local(cfg) else 0.0
            per = (have - sliver) / workers
            plus = f" plus sweep.cpus_per_trial={cfg.sweep.cpus_per_trial:g}" if sliver else ""
            raise UserError(
                f"one sweep trial needs {need:g} {res} (training.num_workers={workers} x "
                f"training.resources_per_worker.{res}{plus}) but the "
                f"cluster has {have:g}: its trainer could never start. Set training.resources_per_worker.{res} <= "
                f"{math.floor(per * 100) / 100:g} or fewer training.num_workers"
            )


def default_max_concurrent_trials(cfg: Config, cluster: dict[str, float], n_trials: int) -> int:
    """How many trials fit on the cluster at once: floor(cluster resource / (num_workers x
    per-worker resource + the trial's own sliver)) over the resources one trial holds (GPU when
    training.use_gpu, CPU always), at least 1 and at most the number of trials."""
    if cfg.sweep.max_concurrent_trials is not None:
        return max(1, min(cfg.sweep.max_concurrent_trials, n_trials))
    fits = [math.floor(cluster.get(res, 0.0) / need + 1e-9) for res, need in _trial_needs(cfg).items() if need > 0]
    limit = min(fits) if fits else n_trials
    return max(1, min(limit, n_trials))


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------


def _run_trial(
    config: dict, *, cfg_dict: dict, run_uri: str, cwd: str, trial_runner: Callable, callbacks: Sequence[Callable]
) -> None:
    """Tune function trainable: the pipeline's trial stages on the trial's child run, then tune.report."""
    from ray import tune

    os.chdir(cwd)  # Tune moves trials into a scratch dir; relative paths in the config mean the driver's cwd
    spec = config["trial"]
    cfg = config_from_dict(cfg_dict)
    run = get_store(run_uri, cfg.storage.endpoint_url, cfg.storage.region)
    trial = run.child("sweep", "trials", spec["name"])
    tcfg = trial_config(cfg, spec, trial)
    log = trial.child("events.jsonl")

    _append(log, {"event": "invoked", "time": time.time()})  # Tune ran this trial (counted by run_sweep)
    for cb in callbacks:
        cb(spec=dict(spec), trial=trial.uri)
    parent = parent_commits(run)
    rec = finished_result(trial, tcfg, parent)
    if rec is not None:
        # Its result is committed for this config and this pool and scores: nothing to run, not even
        # the stage checks (its adapter may have been pruned, or the trial computed on another machine).
        _append(log, {"event": "reused", "time": time.time()})
        tune.report(rec["report"])
        return
    t0 = time.time()
    # the stages' progress (train steps, eval rows) goes to the trial folder, for the driver's console
    previous = console.set_sink(ProgressFile(trial.child(PROGRESS_FILE)))
    try:
        entries = trial_runner(_on_own_resources(tcfg), run.uri)
    finally:
        console.set_sink(previous)
    # Every stage already committed for this trial's config (e.g. under another grid): reused.
    computed = not all(e.get("skipped") for e in entries.values())
    _append(log, {"event": "computed" if computed else "reused", "time": time.time()})

    metrics = trial.child("metrics.json").read_json()
    row = EvalResult.from_metrics(metrics).flat()
    base_file = run.child("sweep", "base_metrics.json")
    if base_file.exists():
        row.update(EvalResult.from_metrics({"base": base_file.read_json().get("base")}).flat())
    objective = entries["select"]["summary"].get("objective")
    steps = entries["train"]["summary"].get("steps")
    report = {
        **row,
        "objective": float(objective) if isinstance(objective, (int, float)) else float("nan"),
        "train_steps": int(steps) if isinstance(steps, (int, float)) else -1,
        "annotated": int(entries["annotate"]["summary"].get("rows", spec["budget"])),
        "trial_wall_s": time.time() - t0,
        # what the trial cost, the parent's scoring included (also logged to MLflow / TensorBoard)
        **_present(compute.result_columns(compute.run_compute(trial, parent=run, inherited=_INHERITED))),
    }
    trial.child("result.json").write_json(
        {"trial_hash": trial_hash(tcfg), "parent": parent, "spec": spec, "report": report, "metrics": metrics}
    )
    tune.report(report)


def parent_commits(run: Store) -> dict[str, str] | None:
    """The config hashes (pool files included) of the stages a trial inherits from the sweep's run,
    as its manifest records them; None unless every one of them is committed."""
    m = run.child("manifest.json")
    stages = (m.read_json() if m.exists() else {}).get("stages") or {}
    out = {}
    for name in _INHERITED:
        e = stages.get(name) or {}
        if e.get("state") != "done" or not e.get("hash"):
            return None
        out[name] = e["hash"]
    return out


def finished_result(trial: Store, tcfg: Config, parent: dict[str, str] | None) -> dict | None:
    """The trial's ``result.json`` when it was written for this trial config and for the parent's
    current pool and scores (``parent_commits``), else None (a result from before that record,
    too: its stages decide)."""
    done = trial.child("result.json")
    if parent is None or not done.exists():
        return None
    rec = done.read_json()
    if rec.get("trial_hash") != trial_hash(tcfg) or rec.get("parent") != parent or "report" not in rec:
        return None
    return rec


def _present(columns: dict) -> dict:
    """The compute columns worth reporting: GPU-seconds only where some were spent."""
    gpu = columns.get("gpu_total_s") or 0.0
    return {k: v for k, v in columns.items() if v is not None and (gpu > 0 or not k.startswith("gpu_"))}


def _append(store: Store, record: dict) -> None:
    """Append one JSON line (read-modify-write: object stores have no append)."""
    rows = store.read_jsonl()
    rows.append(record)
    store.write_jsonl(rows)


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def _base_metrics(cfg: Config, run: Store, progress: bool) -> dict | None:
    """The base model's eval metrics, once for the sweep (every trial shares them)."""
    if not cfg.evaluation.base_model:
        return None
    out = run.child("sweep", "base_metrics.json")
    key = config_hash(cfg, ("pool", "scoring", "evaluation"), extra=cfg.training_model)
    if out.exists():
        prev = out.read_json()
        if prev.get("config_hash") == key:
            return prev
    from .evaluate import evaluate_models

    scratch = run.child("sweep", "base_eval.json")
    t0 = time.time()
    evaluate_models(cfg, run.child("eval.parquet"), None, scratch, progress=progress)
    metrics = scratch.read_json()
    block = metrics.get("base", metrics)
    # the base model's evaluation is part of what the sweep spent (not of any trial's design)
    rec = {"config_hash": key, "base": block, "compute": compute.stage_compute("evaluation", time.time() - t0, {}, cfg)}
    if "lm_eval" in metrics:  # evaluation.lm_eval_tasks: the base model's benchmark scores, for the report
        rec["lm_eval"] = metrics["lm_eval"]
    out.write_json(rec)
    return rec


def run_sweep(
    cfg: Config,
    run: Store,
    progress: bool = True,
    *,
    trial_runner: Callable[[Config, str], dict],
    results: Store | None = None,
    trial_callbacks: Sequence[Callable[..., None]] = (),
) -> dict:
    """Run (or resume) the Tune sweep of ``cfg.sweep`` on the run folder ``run``.

    Needs ``run/pool.parquet``, ``run/eval.parquet`` and ``run/scores.parquet``. Every trial calls
    ``trial_runner(trial_cfg, run.uri)``, which runs the trial's stages on the child run
    ``trial_cfg.output.dir`` and returns {stage: manifest entry} (:func:`edsft.pipeline.run_trial`;
    passed in because the pipeline layer sits above this one). ``trial_callbacks`` are called in
    the trial's process as ``cb(spec=, trial=)`` before its stages run (to log, or to inject a
    failure). Writes ``results`` (default ``run/sweep/results.parquet``) and returns {"trials",
    "finished", "errored", "executed" (trials Tune ran in this call), "computed" (those that ran
    stages rather than reuse committed ones), "results", "experiment", "max_concurrent_trials"}."""
    import ray
    from ray import tune

    from .session import init_ray
    from .tracking import make_tune_callbacks

    for need in ("pool.parquet", "eval.parquet", "scores.parquet"):
        if not run.child(need).exists():
            raise FileNotFoundError(
                f"{run.child(need).uri} (the sweep reuses the run's {need}: run `edsft ingest` and `edsft score` first)"
            )
    if cfg.annotation.mode == "export":
        raise UserError(
            "annotation.mode='export' cannot run a sweep (it stops for human annotators): set annotation.mode=oracle or import"
        )
    specs, notes = expand_grid(cfg)
    for n in notes:
        _log(n)
    init_ray(cfg)
    check_trial_fits(cfg, ray.cluster_resources())
    limit = default_max_concurrent_trials(cfg, ray.cluster_resources(), len(specs))
    name = _experiment_name(cfg, specs)
    rounds = f" x {len(set(s['rounds'] for s in specs))} round counts" if len(cfg.sweep.rounds) > 1 else ""
    _log(
        f"{len(specs)} trials ({len(set(s['selector'] for s in specs))} selectors x {len(cfg.sweep.budgets)} budgets x "
        f"{len(cfg.sweep.seeds)} seeds{rounds}"
        + (f", random also at {list(cfg.sweep.random_budgets)}" if cfg.sweep.random_budgets else "")
        + f"), up to {limit} at once; experiment {name}"
    )

    base = _base_metrics(cfg, run, progress)

    # Trials Tune runs now, and those of them that compute (vs reuse a finished result.json).
    invoked_before = _count_events(run, specs, "invoked")
    computed_before = _count_events(run, specs, "computed")

    tune_root = run.child("sweep", "tune")
    remote = tune_root.uri.startswith("s3://")
    fs = tune_root.fs if remote else None
    storage_path = tune_root.path if remote else tune_root.uri
    # Never Tuner.restore: it unpickles tuner.pkl from the run folder, which may be a shared bucket
    # (whoever can write there would run code in this driver). A re-run builds the grid afresh and
    # each finished trial returns its committed result.json at once (finished_result), so Tune's
    # folder is a log, written once per attempt and never read back.
    attempt = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            cfg_dict=config_to_dict(cfg),
            run_uri=run.uri,
            cwd=os.getcwd(),
            trial_runner=trial_runner,
            callbacks=list(trial_callbacks),
        ),
        _trial_resources(cfg),
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=limit,
            trial_name_creator=lambda t: t.config["trial"]["name"],
            trial_dirname_creator=lambda t: t.config["trial"]["name"],
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{attempt}",
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
            verbose=1 if progress else 0,
            # MLflow / TensorBoard / W&B per trial (output.report_to), trials done on the console
            callbacks=[*make_tune_callbacks(cfg), _trial_progress(len(specs), run)],
        ),
    )
    t0 = time.time()
    console.progress(0, len(specs), "trials")  # the console's line counts trials from here on
    grid = tuner.fit()
    wall = time.time() - t0

    errors = {}
    for r in grid:
        spec = (r.config or {}).get("trial", {})
        if r.error is not None and spec:
            errors[spec["name"]] = f"{type(r.error).__name__}: {r.error}"[:2000]
    table, spent = _collect(run, cfg, specs, errors, base)
    out = results if results is not None else run.child("sweep", "results.parquet")
    out.write_table(table)
    statuses = table.column("status").to_pylist()
    executed = _count_events(run, specs, "invoked") - invoked_before
    computed = _count_events(run, specs, "computed") - computed_before
    summary = {
        "trials": len(specs),
        "finished": statuses.count("TERMINATED"),
        "errored": statuses.count("ERROR"),
        "executed": executed,
        "computed": computed,
        "results": out.uri,
        "experiment": tune_root.child(f"{name}-{attempt}").uri,
        "max_concurrent_trials": limit,
        "wall_s": round(wall, 3),
        "notes": notes,
        # the sweep's compute (edsft.compute): its finished trials' own stages and the base model's
        # evaluation; the scoring they share is the run's score stage
        "compute_s": spent["compute_s"],
        "gpu_s": spent["gpu_s"],
    }
    for n, e in errors.items():
        _log(f"trial {n} failed: {e.splitlines()[0] if e else e} (re-run the sweep to retry only the failed trials)")
    _log(
        f"{summary['finished']}/{len(specs)} trials finished ({executed} ran now, {computed} of them computed, "
        f"{executed - computed} reused a finished result) in {wall:.1f} s -> {out.uri}"
    )
    return summary


def collect_results(cfg: Config, run: Store) -> dict:
    """Rewrite ``run/sweep/results.parquet`` from the trial folders alone (no Tune): for a look at
    a sweep that is still running (unfinished trials are PENDING) or was stopped."""
    table = trial_results(cfg, run)  # one row per trial of the grid
    out = run.child("sweep", "results.parquet")
    out.write_table(table)
    statuses = table.column("status").to_pylist()
    return {
        "trials": table.num_rows,
        "finished": statuses.count("TERMINATED"),
        "pending": statuses.count("PENDING"),
        "results": out.uri,
    }


def trial_results(cfg: Config, run: Store) -> pa.Table:
    """The results table of ``cfg``'s grid from the trial folders alone, without writing anything:
    finished trials are TERMINATED, the others PENDING (safe to call while the sweep runs)."""
    specs, _ = expand_grid(cfg)
    base_file = run.child("sweep", "base_metrics.json")
    return _collect(run, cfg, specs, {}, base_file.read_json() if base_file.exists() else None)[0]


def _count_events(run: Store, specs: list[dict], event: str) -> int:
    n = 0
    for s in specs:
        n += sum(1 for r in run.child("sweep", "trials", s["name"], "events.jsonl").read_jsonl() if r.get("event") == event)
    return n


def _collect(run: Store, cfg: Config, specs: list[dict], errors: dict[str, str], base: dict | None) -> tuple[pa.Table, dict]:
    """One row per trial from the trials' result.json (the source of truth, also across
    attempts); trials without a result are ERROR (with Tune's error) or PENDING. A finished trial's
    compute comes from its manifests (and the parent's, for the scoring it inherits), so trials that
    finished before compute accounting get it too. Also returns the sweep's own compute: the finished
    trials' own stages plus the base model's evaluation (``{"compute_s", "gpu_s"}``)."""
    base_flat = EvalResult.from_metrics({"base": base.get("base")}).flat() if base else {}
    rows = []
    spent = [base["compute"]] if base and isinstance(base.get("compute"), dict) else []
    for s in specs:
        trial = run.child("sweep", "trials", s["name"])
        row: dict[str, Any] = {c: None for c in RESULT_COLUMNS}
        row.update(
            trial_id=s["name"],
            selector=s["selector"],
            params=json.dumps(s["params"], sort_keys=True),
            budget=s["budget"],
            seed=s["seed"],
            rounds=int(s.get("rounds", 1)),
        )
        done = trial.child("result.json")
        rec = done.read_json() if done.exists() else None
        # Tune's verdict on this experiment's trial comes first: a result.json left by an earlier
        # sweep does not make a trial that failed now count as finished.
        if s["name"] not in errors and rec is not None and rec.get("trial_hash") == trial_hash(trial_config(cfg, s, trial)):
            rep = rec["report"]
            for m in METRICS:
                row[m] = rep.get(m)
                row[f"base_{m}"] = rep.get(f"base_{m}", base_flat.get(f"base_{m}"))
            row.update(
                objective=rep.get("objective"),
                train_steps=rep.get("train_steps"),
                wall_s=rep.get("trial_wall_s"),
                status="TERMINATED",
                metrics=json.dumps(rec.get("metrics", {}), default=str),
            )
            spend = compute.run_compute(trial, parent=run, inherited=_INHERITED)
            row.update(compute.result_columns(spend))
            spent += list(spend["stages"].values())
        else:
            row.update(status="ERROR" if s["name"] in errors else "PENDING", error=errors.get(s["name"]))
        rows.append(row)
    # GPU-seconds only where some trial spent any: a CPU sweep's table has no columns of zeros
    gpu_columns = compute.GPU_COLUMNS if any((r.get("gpu_total_s") or 0) > 0 for r in rows) else ()
    for r in rows:
        for c in compute.GPU_COLUMNS:
            if c not in gpu_columns:
                r.pop(c, None)
    schema = pa.schema(
        [
            ("trial_id", pa.string()),
            ("selector", pa.string()),
            ("params", pa.string()),
            ("budget", pa.int64()),
            ("seed", pa.int64()),
            ("rounds", pa.int64()),
        ]
        + [(m, pa.float64()) for m in METRICS]
        + [(f"base_{m}", pa.float64()) for m in METRICS]
        + [
            ("objective", pa.float64()),
            ("train_steps", pa.int64()),
            ("wall_s", pa.float64()),
        ]
        + [(c, pa.float64()) for c in compute.COLUMNS + gpu_columns]
        + [
            ("status", pa.string()),
            ("error", pa.string()),
            ("metrics", pa.string()),
        ]
    )
    total = compute.add(spent)
    return pa.Table.from_pylist(rows, schema=schema), {"compute_s": total["compute_s"], "gpu_s": total["gpu_s"]}
