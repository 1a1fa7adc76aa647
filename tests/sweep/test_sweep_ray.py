"""A real Tune sweep on the 2-CPU ray_cluster: tiny Llama, real select/annotate/train/evaluate stages.

The run folder (pool, eval split, scores) is built once by the pipeline's ingest and score stages;
the sweep reuses its scores.parquet like a real run does.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pyarrow.parquet as pq
import pytest

from edsft.config import config_from_dict
from edsft.pipeline import run_trial
from edsft.storage import get_store

pytestmark = pytest.mark.slow


def _cfg(run_dir, **sweep):
    return config_from_dict(
        {
            "pool": {"path": "builtin:tasks", "size": 120, "eval_size": 28},
            "scoring": {
                "model": "builtin:tiny-llama",
                "max_new_tokens": 4,
                "batch_size": 32,
                "num_actors": 1,
                "cpus_per_actor": 0.5,
            },
            "selection": {"name": "facility_location", "mode": "local"},
            "training": {
                "backend": "ddp",
                "num_workers": 1,
                "resources_per_worker": {"CPU": 1},
                "max_seq_len": 64,
                "micro_batch_size": 8,
                "max_steps": 2,
            },
            "evaluation": {"max_new_tokens": 4, "max_examples": 28},
            "sweep": {"enabled": True, **sweep},
            "output": {"dir": str(run_dir), "progress": False},
        }
    )


class FailOnce:
    """Trial callback: fail trial ``name`` the first time it starts (a lock file remembers)."""

    def __init__(self, name: str, lock: str):
        self.name, self.lock = name, lock

    def __call__(self, *, spec, trial):
        if spec["name"] != self.name:
            return
        try:
            os.close(os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # failed before: let the resumed trial run
        raise RuntimeError(f"injected failure of trial {self.name} (lock file {self.lock} now exists)")


def _scored_copy(scored_run, run_dir):
    """A run folder of its own with the scored run's pool, eval split, scores and manifest (no sweep)."""
    import shutil

    run_dir.mkdir()
    for name in ("pool.parquet", "eval.parquet", "scores.parquet", "score_quarantine.jsonl", "quarantine.jsonl", "manifest.json"):
        (shutil.copytree if (scored_run / name).is_dir() else shutil.copy)(scored_run / name, run_dir / name)
    return run_dir


@pytest.fixture(scope="module")
def scored_run(ray_cluster, tmp_path_factory):
    from edsft import pipeline

    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    cfg = _cfg(run_dir)
    pipeline.run_stage(cfg, "ingest")
    pipeline.run_stage(cfg, "score")
    return run_dir


def test_tiny_sweep_one_row_per_trial_with_random(scored_run):
    from edsft.distributed.sweep import run_sweep
    from edsft.report import build_report

    cfg = _cfg(scored_run, selectors=["k_center"], budgets=[8, 16], seeds=[0])
    run = get_store(scored_run)
    out = run_sweep(cfg, run, progress=False, trial_runner=run_trial)
    assert out["trials"] == 4 and out["finished"] == 4 and out["errored"] == 0
    assert out["executed"] == 4 and out["computed"] == 4
    t = pq.read_table(scored_run / "sweep" / "results.parquet").to_pandas()
    assert len(t) == 4 and sorted(t.trial_id) == ["k_center-b16-s0", "k_center-b8-s0", "random-b16-s0", "random-b8-s0"]
    assert set(t.selector) == {"random", "k_center"} and set(t.status) == {"TERMINATED"}
    for m in ("exact_match", "rouge_l", "loss", "base_loss"):
        assert t[m].map(math.isfinite).all(), m
    assert (t["exact_match"].between(0, 1)).all() and (t["loss"] > 0).all()
    # each trial annotated exactly its budget, picked by its selector
    for _, r in t.iterrows():
        trial = scored_run / "sweep" / "trials" / r.trial_id
        sel = pq.read_table(trial / "selection.parquet").to_pandas()
        assert len(sel) == r.budget and set(sel.selector) == {r.selector}
        assert pq.read_table(trial / "annotated.parquet").num_rows == r.budget
        assert (trial / "metrics.json").exists() and r.train_steps == 2
        # the trial told the driver how far it was: its last stage's progress, in its own folder
        prog = json.loads((trial / "progress.json").read_text())
        assert prog["stage"] == "evaluate" and prog["stage_started"] <= prog["time"]
    # every trial's compute includes the run's scoring, which it inherits, and its own stages
    from edsft.compute import run_compute

    scoring = run_compute(run)["compute_s"]["scoring"]
    assert scoring > 0 and (t["compute_scoring_s"] == scoring).all() and (t["rounds"] == 1).all()
    for kind in ("selection", "training", "evaluation"):
        assert (t[f"compute_{kind}_s"] > 0).all(), kind
    parts = t[[f"compute_{k}_s" for k in ("scoring", "selection", "training", "evaluation")]].sum(axis=1)
    assert (abs(t["compute_total_s"] - parts) < 1e-6).all() and "gpu_total_s" not in t.columns
    # the sweep's own figure: its trials' stages (not the shared scoring) and the base model's evaluation
    assert out["compute_s"]["training"] == pytest.approx(t["compute_training_s"].sum(), abs=1e-2)
    assert out["compute_s"]["scoring"] == 0 and out["compute_s"]["evaluation"] > t["compute_evaluation_s"].sum()
    # re-running the finished sweep computes nothing, and reads no pickle from the run folder (Tune's
    # restore would unpickle tuner.pkl, and the run folder may be a shared bucket): a planted one
    # that touches a file when unpickled stays unread
    import pathlib
    import pickle

    class Planted:
        def __reduce__(self):
            return (pathlib.Path.touch, (scored_run / "UNPICKLED",))

    planted = list((scored_run / "sweep" / "tune").rglob("tuner.pkl"))
    assert planted, "Tune wrote its state for the first attempt"
    for p in planted:
        p.write_bytes(pickle.dumps(Planted()))
    again = run_sweep(cfg, run, progress=False, trial_runner=run_trial)
    assert again["executed"] == 4 and again["computed"] == 0 and again["finished"] == 4
    assert not (scored_run / "UNPICKLED").exists()
    assert pickle.loads(planted[0].read_bytes()) is None and (scored_run / "UNPICKLED").exists()  # the plant works
    rep = build_report(run)
    assert (scored_run / "report" / "report.md").exists() and rep["trials"] == 4
    assert "single seed" in (scored_run / "report" / "report.md").read_text()


def test_interrupted_sweep_resumes_only_unfinished_trials(scored_run, tmp_path):
    """A sweep whose k_center trial fails once: the re-run computes only that trial; the finished
    one returns its result. (Its grid is a subset of the test above, so where that ran first the
    trials reuse their committed results instead of training again; the bookkeeping is the same.)"""
    from edsft.distributed.sweep import run_sweep

    cfg = _cfg(scored_run, selectors=["random", "k_center"], budgets=[8], seeds=[0])
    run = get_store(scored_run)
    lock = tmp_path / "fail-once.lock"
    invoked = lambda name: [e["event"] for e in run.child("sweep", "trials", name, "events.jsonl").read_jsonl()].count("invoked")  # noqa: E731
    before = {n: invoked(n) for n in ("random-b8-s0", "k_center-b8-s0")}
    had_result = (scored_run / "sweep" / "trials" / "k_center-b8-s0" / "result.json").exists()

    from ray import cloudpickle

    # the hook travels to Tune's trial actors, which cannot import this test module by name
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fail = FailOnce("k_center-b8-s0", str(lock))
    first = run_sweep(cfg, run, progress=False, trial_runner=run_trial, trial_callbacks=[fail])
    assert lock.exists() and first["executed"] == 2 and first["finished"] == 1 and first["errored"] == 1
    t = pq.read_table(scored_run / "sweep" / "results.parquet").to_pandas().set_index("trial_id")
    assert t.loc["k_center-b8-s0", "status"] == "ERROR" and "injected failure" in t.loc["k_center-b8-s0", "error"]
    assert t.loc["random-b8-s0", "status"] == "TERMINATED"
    assert math.isnan(t.loc["k_center-b8-s0", "exact_match"])

    second = run_sweep(cfg, run, progress=False, trial_runner=run_trial, trial_callbacks=[fail])
    assert second["executed"] == 2 and second["finished"] == 2 and second["errored"] == 0
    assert second["computed"] == (0 if had_result else 1)  # only the failed trial, if it had no result yet
    assert invoked("random-b8-s0") - before["random-b8-s0"] == 2  # ran, then returned its result
    assert invoked("k_center-b8-s0") - before["k_center-b8-s0"] == 2  # failed, then resumed
    t = pq.read_table(scored_run / "sweep" / "results.parquet").to_pandas()
    assert len(t) == 2 and set(t.status) == {"TERMINATED"} and t.exact_match.notna().all()


def test_two_seed_sweep_report_draws_intervals_and_the_headline_they_allow(scored_run):
    """The quickstart's shape on the tiny model: a selector against random over two seeds, random also at
    a budget beyond the selector's (sweep.random_budgets), metric loss. The report must carry the
    intervals (curves and B / B_random) and a headline that says exactly what those intervals allow."""
    import matplotlib
    import numpy as np
    import pandas as pd

    from edsft import report as R
    from edsft.distributed.sweep import run_sweep

    matplotlib.use("Agg")
    cfg = _cfg(scored_run, selectors=["typiclust"], budgets=[8], random_budgets=[16], seeds=[0, 1], metric="loss")
    run = get_store(scored_run)
    out = run_sweep(cfg, run, progress=False, trial_runner=run_trial)
    assert out["trials"] == 6 and out["finished"] == 6 and out["errored"] == 0
    t = pq.read_table(scored_run / "sweep" / "results.parquet").to_pandas()
    assert sorted(t.trial_id) == sorted(
        [f"random-b{b}-s{s}" for b in (8, 16) for s in (0, 1)] + ["typiclust-b8-s0", "typiclust-b8-s1"]
    )
    assert t["loss"].map(math.isfinite).all()

    rep = R.build_report(run, metric="loss")
    report_dir = scored_run / "report"
    md = (report_dir / "report.md").read_text()
    head = rep["headline"]
    assert f"**Headline (loss).** {head['text']}" in md
    assert "95% t-interval over seeds" in md and "bootstrap interval over seeds and eval prompts" in md
    # the curves table gives each cell's interval over its 2 seeds
    summ = R.summarize(R.load_results(t), "loss")
    for r in summ.itertuples():
        assert r.n == 2 and f"{r.mean:.3f} [{r.lo:.3f}, {r.hi:.3f}] (n=2)" in md
    # the plot draws them: one band per selector with >= 2 budgets, error bars at every cell
    fig = R.plot_learning_curves(summ, "loss")
    ax = fig.axes[0]
    bars = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    assert sum(len(c.get_segments()) for c in bars) == len(summ) == 3 and "95% t-interval" in ax.get_title()
    matplotlib.pyplot.close(fig)

    # B / B_random with its interval, and the headline is the one those intervals allow
    pb = pd.read_csv(report_dir / "label_efficiency_intervals_loss.csv")
    assert list(pb["budget"]) == [8] and list(pb["label"]) == ["typiclust"] and (pb["n_seeds"] == 2).all()
    r = pb.iloc[0]
    if np.isnan(r["ratio"]):  # random's loss did not move between 8 and 16 labels
        assert "does not change across its budgets" in head["text"]
        return
    assert r["lo"] <= r["ratio"] <= r["hi"] or r["ratio_bound"] in ("<", ">")
    bound = "" if pd.isna(r["ratio_bound"]) else r["ratio_bound"]
    interval = R.format_interval(r)  # each end with "<" / ">" where it is a bound
    cell = f"B=8: {bound}{r['ratio']:.2f}x {interval}"
    assert cell in head["text"] and f"| typiclust | {bound}{r['ratio']:.2f} {interval}" in md
    if r["hi"] < 1:
        assert head["selector"] == "typiclust" and "fewer labels at 1 of 1 budgets" in head["text"]
    elif r["lo"] > 1:
        assert head["selector"] is None and "significantly MORE labels than random" in head["text"]
        assert head["worse_budgets"] == {"typiclust": [8]} and "not significant" not in head["text"]
    else:
        assert head["selector"] is None and "not significant (interval includes 1): typiclust at B=8" in head["text"]
        assert "MORE" not in head["text"]


def test_a_trial_runs_its_rounds_inside_tune(scored_run, tmp_path):
    """sweep.rounds = [2]: the uncertainty trial (a Tune function trainable holding a sliver of a CPU)
    runs round 1, re-scores the rest of the pool on Ray Data from inside the trial with round 1's
    adapter, picks round 2, then trains and evaluates on the union; random runs one-shot beside it."""

    from edsft.distributed.sweep import run_sweep

    run_dir = _scored_copy(scored_run, tmp_path / "run")  # this sweep's results must not mix with the others'
    cfg = _cfg(run_dir, selectors=["uncertainty"], budgets=[8], seeds=[0], rounds=[2])
    out = run_sweep(cfg, get_store(run_dir), progress=False, trial_runner=run_trial)
    assert out["trials"] == 2 and out["finished"] == 2 and out["errored"] == 0, out
    trial = run_dir / "sweep" / "trials" / "uncertainty-r2-b8-s0"
    manifest = json.loads((trial / "manifest.json").read_text())["stages"]
    assert list(manifest) == ["round1", "round2", "select", "annotate", "train", "evaluate"]
    b1 = pq.read_table(trial / "rounds" / "1" / "selection.parquet").column("row_id").to_pylist()
    b2 = pq.read_table(trial / "rounds" / "2" / "selection.parquet").column("row_id").to_pylist()
    assert len(b1) == len(b2) == 4 and not set(b1) & set(b2)
    assert pq.read_table(trial / "selection.parquet").column("row_id").to_pylist() == b1 + b2
    rescored = manifest["round2"]["summary"]["rescored"]
    assert rescored["rows_scored"] == 120 - 4 - rescored["rows_quarantined"]
    assert manifest["round2"]["summary"]["compute_s"]["scoring"] > 0
    # the results row counts the re-scoring and round 1's training on top of what one-shot random spent
    t = pq.read_table(run_dir / "sweep" / "results.parquet").to_pandas().set_index("trial_id")
    two, one = t.loc["uncertainty-r2-b8-s0"], t.loc["random-b8-s0"]
    assert (two["rounds"], one["rounds"]) == (2, 1)
    assert two["compute_scoring_s"] > one["compute_scoring_s"]
    # training: round 1's and the final run's (comparing with random's is not a test: with
    # training.mode local the first stage to import torch/peft/DeepSpeed in a trial process pays it,
    # and here that is random's training but the multi-round trial's re-scoring)
    round1_training = manifest["round1"]["compute"]["compute_s"]["training"]
    final_training = manifest["train"]["compute"]["compute_s"]["training"]
    assert round1_training > 0 and final_training > 0
    assert two["compute_training_s"] == pytest.approx(round1_training + final_training, abs=0.01)


def test_a_finished_trial_is_reused_from_its_result_without_its_artifacts(scored_run, tmp_path):
    """A trial whose result.json names this trial config and the run's current pool and scores is
    finished, as it stands: its adapter and checkpoints may be gone (pruned, or the result was computed
    on another machine and brought over). A result recorded for other scores is recomputed."""
    import shutil

    from edsft.distributed.sweep import run_sweep

    run_dir = _scored_copy(scored_run, tmp_path / "run")
    cfg = _cfg(run_dir, selectors=["random"], budgets=[8], seeds=[0])
    run = get_store(run_dir)
    first = run_sweep(cfg, run, progress=False, trial_runner=run_trial)
    assert first["finished"] == 1 and first["computed"] == 1
    trial = run_dir / "sweep" / "trials" / "random-b8-s0"
    rec = json.loads((trial / "result.json").read_text())
    scores_hash = json.loads((run_dir / "manifest.json").read_text())["stages"]["score"]["hash"]
    assert rec["parent"]["score"] == scores_hash and set(rec["parent"]) == {"ingest", "score"}
    before = pq.read_table(run_dir / "sweep" / "results.parquet").to_pandas()

    # what travels: the result, metrics, predictions and manifest; no adapter, no selection, no Tune state
    keep = {"result.json", "metrics.json", "predictions.jsonl", "manifest.json", "events.jsonl"}
    for p in trial.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(run_dir / "sweep" / "tune")
    again = run_sweep(cfg, run, progress=False, trial_runner=run_trial)
    assert again["executed"] == 1 and again["computed"] == 0 and again["finished"] == 1
    assert sorted(p.name for p in trial.iterdir()) == sorted(keep)  # nothing was recomputed
    after = pq.read_table(run_dir / "sweep" / "results.parquet").to_pandas()
    for col in ("exact_match", "loss", "train_steps", "compute_training_s"):
        assert after[col].tolist() == before[col].tolist(), col

    # the same result recorded against other scores is stale: the trial runs its stages again
    rec["parent"]["score"] = "0" * len(scores_hash)
    (trial / "result.json").write_text(json.dumps(rec))
    shutil.rmtree(run_dir / "sweep" / "tune")
    third = run_sweep(cfg, run, progress=False, trial_runner=run_trial)
    assert third["computed"] == 1 and third["finished"] == 1
    assert (trial / "selection.parquet").exists()
    assert json.loads((trial / "result.json").read_text())["parent"]["score"] == scores_hash


@pytest.mark.timeout(420)
def test_two_in_process_trials_filling_the_cluster_still_evaluate_on_ray_data(scored_run, tmp_path):
    """Two trials side by side, each training in its own process and holding 0.95 of the 2 CPUs, then
    evaluating through Ray Data actors (evaluation.mode distributed, what 560 eval rows get): the
    actors run on the CPUs their trial holds. Asking the cluster for 0.5 CPU each left both pending
    on the 0.1 CPU free until Ray Data's 30-minute no-progress timeout (the label-efficiency run)."""
    from edsft.distributed.sweep import default_max_concurrent_trials, run_sweep

    run_dir = _scored_copy(scored_run, tmp_path / "run")
    cfg = _cfg(run_dir, selectors=["k_center"], budgets=[8], seeds=[0]).replace(
        **{"training.resources_per_worker": {"CPU": 0.95}, "evaluation.mode": "distributed", "evaluation.cpus_per_actor": 0.5}
    )
    assert cfg.training.resolved_mode == "local" and default_max_concurrent_trials(cfg, {"CPU": 2.0}, 2) == 2
    out = run_sweep(cfg, get_store(run_dir), progress=False, trial_runner=run_trial)
    assert out["trials"] == 2 and out["finished"] == 2 and out["errored"] == 0, out
    for name in ("random-b8-s0", "k_center-b8-s0"):
        metrics = json.loads((run_dir / "sweep" / "trials" / name / "metrics.json").read_text())
        assert metrics["settings"]["mode"] == "distributed" and metrics["n"] == 28
