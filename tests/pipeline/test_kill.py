"""Fault injection: SIGKILL `edsft run` (smoke config) at random moments in every stage.

An uninterrupted run first measures each stage's duration (from the "<stage>: running" and
"<stage>: ... in X s" log lines). Then 20 kills, drawn with a fixed seed, land at a random
fraction of a stage's duration after that stage starts, or right after it ends if it is quicker,
stages in pipeline order; the duration is the one of the latest run that ran the stage whole (the
reference's at first: the machine's load changes). After every kill the test checks that each
stage the next `run` would skip holds exactly the reference's artifact, and re-runs. A kill planned
in a stage that is committed already, and one whose run finishes before it, go to a fresh run
folder (a finished one must equal the reference too), so every one of the 20 kills lands. The run that finally completes must equal the reference:
the same row ids in pool, eval split, scores, selection and annotation, a trained adapter and
the same number of eval rows.

A second test kills a smoke sweep (`sweep.enabled`: random and facility location at one budget
and one seed) inside its trials: at a seeded fraction of the reference's duration of a trial's
stage once that stage starts, or right after it commits. After every kill no trial may have a
result that counts as finished while one of its stages is not committed with the reference's
artifact, and the finished run has the uninterrupted sweep's trial set and, per trial, its
selection.

The `edsft run` processes join the session's Ray cluster (RAY_ADDRESS, pinned by the fixture),
so a killed driver leaves no cluster behind and a re-run starts in seconds.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from edsft.config import load_config
from edsft.distributed.sweep import expand_grid, trial_config, trial_hash
from edsft.pipeline import STAGING, TRIAL_STAGES, Run, trial_run, why_not_done

# 4-7 minutes each on 2 quiet cores; a loaded machine can take three times that (the suite's default is 900 s)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "jobs/configs/smoke.yaml"
# The smoke config, a little smaller: the kills cost reruns of partial stages.
OVERRIDES = [
    "pool.size=80",
    "pool.eval_size=20",
    "training.max_steps=4",
    "training.checkpoint_every=2",
    "evaluation.max_examples=20",
    "output.progress=false",
]
STAGES = ["ingest", "score", "select", "annotate", "train", "evaluate"]
N_KILLS = 20
_LINE = re.compile(r"^\[edsft\] (\w+): (running|up to date|.* in [0-9.]+ s ->)")


class Driver:
    """One `edsft run` process; its stderr lines are read on a thread, with their arrival times."""

    def __init__(self, out: Path, extra: tuple[str, ...] = ()):
        self.start = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edsft", "run", "--config", SMOKE, f"output.dir={out}", *OVERRIDES, *extra],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.t0 = time.monotonic()
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.events: list[tuple[float, str, str]] = []  # (time, stage, "start" | "end" | "skip")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            m = _LINE.match(line)
            if m:
                kind = {"running": "start", "up to date": "skip"}.get(m.group(2), "end")
                ev = (time.monotonic() - self.t0, m.group(1), kind)
                self.events.append(ev)
                self.lines.put(ev)
        self.lines.put(None)

    def next_event(self, timeout: float = 600):
        return self.lines.get(timeout=timeout)

    def durations(self) -> dict[str, float]:
        """How long each stage this run ran whole took (from its start and end lines)."""
        starts = {s: t for t, s, k in self.events if k == "start"}
        return {s: t - starts[s] for t, s, k in self.events if k == "end" and s in starts}

    def wait_in(self, stage: str, seconds: float) -> None:
        """Wait ``seconds`` into ``stage``, or until it ends if it is quicker this time: a kill planned
        in a stage then lands in it or right after it, never stages later (a run on a machine quieter
        than the reference's would otherwise run ahead of the plan, and later kills pile up in the last stage)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.lines.get(timeout=left)
            except queue.Empty:
                return
            if ev is None or (ev[1] == stage and ev[2] == "end"):
                return

    def finish(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # let the reader drain the pipe
        return rc

    def tail(self) -> str:
        return "".join(self.log[-40:])


def _ids(path: Path) -> set:
    return set(pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist())


def _artifacts(out: Path) -> dict:
    """What a finished stage must have produced, per stage, in comparable form."""
    summary = (
        json.loads((out / "train" / "train_summary.json").read_text()) if (out / "train" / "train_summary.json").exists() else {}
    )
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return {
        "ingest": lambda: (_ids(out / "pool.parquet"), _ids(out / "eval.parquet")),
        "score": lambda: _ids(out / "scores.parquet"),
        "select": lambda: _ids(out / "selection.parquet"),
        "annotate": lambda: _ids(out / "annotated.parquet"),
        "train": lambda: ((out / "train" / "adapter" / "adapter_model.safetensors").exists(), summary.get("steps")),
        "evaluate": lambda: (metrics.get("n"), sorted(metrics.get("variants", []))),
    }


def test_sigkill_at_random_moments_never_leaves_a_stage_that_passes_for_finished(ray_cluster, tmp_path):
    assert os.environ.get("RAY_ADDRESS"), "the ray_cluster fixture pins RAY_ADDRESS for the child processes"
    ref_dir, out = tmp_path / "reference", tmp_path / "killed"
    t_start = time.monotonic()

    ref = Driver(ref_dir)
    assert ref.finish() == 0, ref.tail()
    starts = {s: t for t, s, k in ref.events if k == "start"}
    ends = {s: t for t, s, k in ref.events if k == "end"}
    assert list(starts) == STAGES, ref.tail()
    duration = {s: ends[s] - starts[s] for s in STAGES}
    reference = {s: get() for s, get in _artifacts(ref_dir).items()}
    ref_wall = time.monotonic() - t_start

    # 20 kills spread over the stages in pipeline order, at a seeded random fraction of each
    # stage's measured duration; the long stages (score, train) get more of them.
    rng = random.Random(14)
    per_stage = {"ingest": 3, "score": 5, "select": 3, "annotate": 2, "train": 4, "evaluate": 3}
    assert sum(per_stage.values()) == N_KILLS
    plan = [(s, rng.uniform(0.02, 0.98)) for s in STAGES for _ in range(per_stage[s])]

    landed: list[str] = []
    folders = 0
    cfg = load_config(SMOKE, [f"output.dir={out}", *OVERRIDES])
    # Each stage's duration in the latest run that ran it whole (the reference's at first): the plan
    # keeps to the machine's pace, which changes with its load.
    pace = dict(duration)
    for stage, frac in plan:
        for attempt in range(3):
            if why_not_done(Run.open(cfg), stage) is None:
                # The planned stage is committed here (the last kill came right after it ended): nothing
                # of it is left to interrupt in this folder, so the kill goes to a fresh one.
                folders += 1
                out = tmp_path / f"killed-{folders}"
                cfg = load_config(SMOKE, [f"output.dir={out}", *OVERRIDES])
            d = Driver(out)
            while True:  # wait for the planned stage
                ev = d.next_event()
                if ev is None:
                    break
                _, s, kind = ev
                if kind == "start" and STAGES.index(s) >= STAGES.index(stage):
                    # a retry waits less: the run that outran the last kill may be faster than the
                    # reference's (a resumed stage, a quieter machine)
                    d.wait_in(s, frac * pace[s] * 0.5**attempt)
                    break
            if d.proc.poll() is None:
                break
            # Finished before the kill (a resumed stage, or a machine faster than the reference's
            # run): nothing left to interrupt in this folder. Its finished state must still be the
            # reference's; the kill then goes to a fresh run folder.
            assert d.finish() == 0, d.tail()
            assert {s: get() for s, get in _artifacts(out).items()} == reference
            pace.update(d.durations())
            folders += 1
            out = tmp_path / f"killed-{folders}"
            cfg = load_config(SMOKE, [f"output.dir={out}", *OVERRIDES])
        else:
            pytest.fail(f"three runs in a row finished before the kill planned in {stage}")
        d.proc.send_signal(signal.SIGKILL)
        d.finish()
        pace.update(d.durations())
        running = [s for _, s, k in d.events if k == "start"]
        done_now = {s for _, s, k in d.events if k == "end"}
        landed.append(next((s for s in reversed(running) if s not in done_now), f"after {running[-1]}" if running else "startup"))

        # No stage the next run would skip may hold anything but the reference's artifact.
        run = Run.open(cfg)
        now = _artifacts(out)
        for s in STAGES:
            if why_not_done(run, s) is None:
                assert now[s]() == reference[s], (
                    f"kill #{len(landed)} (in {landed[-1]}) left {s} committed with a different artifact"
                )

    final = Driver(out)
    assert final.finish() == 0, final.tail()
    assert {s: get() for s, get in _artifacts(out).items()} == reference
    assert all(why_not_done(Run.open(cfg), s) is None for s in STAGES)
    assert not (out / "_staging").exists()

    kills_in = {s: landed.count(s) for s in STAGES}
    print(
        f"\nkills: {len(landed)}, landed in {kills_in} (others between stages: "
        f"{[x for x in landed if x not in STAGES]}); reference run {ref_wall:.0f} s, stages "
        f"{ {s: round(v, 1) for s, v in duration.items()} }, fresh run folders {folders}, whole test {time.monotonic() - t_start:.0f} s, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    assert len(landed) >= N_KILLS
    # every stage that lasts long enough to be hit was hit (annotate takes milliseconds)
    assert all(kills_in[s] >= 1 for s in STAGES if duration[s] > 0.5), kills_in


SWEEP = ("sweep.enabled=true", "sweep.selectors=[random,facility_location]", "sweep.budgets=[16]", "sweep.seeds=[0]")
SWEEP_STAGES = ["ingest", "score", "sweep", "report"]
N_SWEEP_KILLS = 5


def _trials(cfg) -> dict:
    """{trial name: (its child run, its trial config)} for every trial of the sweep's grid."""
    parent = Run.open(cfg)
    out = {}
    for spec in expand_grid(cfg)[0]:
        tcfg = trial_config(cfg, spec, parent.path("sweep", "trials", spec["name"]))
        out[spec["name"]] = (trial_run(tcfg, parent.store.uri), tcfg)
    return out


def _trial_artifacts(trial_dir: Path) -> dict:
    return {s: get for s, get in _artifacts(trial_dir).items() if s in TRIAL_STAGES}


def _trial_set(out: Path) -> list:
    """What the sweep reports per trial (the metrics' values aside: comparable across runs)."""
    t = pq.read_table(out / "sweep" / "results.parquet").to_pylist()
    keys = ("trial_id", "selector", "params", "budget", "seed", "status", "train_steps")
    return sorted(tuple(r[k] for k in keys) for r in t)


def _finished(out: Path, cfg) -> dict:
    """Everything a finished sweep run must equal: the run's own artifacts, the trial set, each trial's."""
    top = _artifacts(out)
    return {
        "pool": top["ingest"](),
        "scores": top["score"](),
        "trials": _trial_set(out),
        "report": (out / "report" / "report.md").exists(),
        **{name: {s: get() for s, get in _trial_artifacts(out / "sweep" / "trials" / name).items()} for name in _trials(cfg)},
    }


def _stage_started(trial_dir: Path, stage: str, since: float) -> bool:
    """The trial's stage started after ``since`` (its staging marker is rewritten at every start)."""
    try:
        return (trial_dir / STAGING / stage / "_attempt.json").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _stage_running(trial_dir: Path, stage: str) -> bool:
    return (trial_dir / STAGING / stage / "_attempt.json").exists()


def test_sigkill_inside_sweep_trials_never_reports_a_trial_finished_with_a_partial_artifact(ray_cluster, tmp_path):
    assert os.environ.get("RAY_ADDRESS"), "the ray_cluster fixture pins RAY_ADDRESS for the child processes"
    ref_dir, out = tmp_path / "reference", tmp_path / "killed"
    t_start = time.monotonic()

    ref = Driver(ref_dir, SWEEP)
    assert ref.finish() == 0, ref.tail()
    assert [s for _, s, k in ref.events if k == "start"] == SWEEP_STAGES, ref.tail()
    ref_cfg = load_config(SMOKE, [f"output.dir={ref_dir}", *OVERRIDES, *SWEEP])
    reference = _finished(ref_dir, ref_cfg)
    names = list(_trials(ref_cfg))
    assert len(names) == 2 and all(t[5] == "TERMINATED" for t in reference["trials"]), reference["trials"]
    # each trial stage's duration in the reference, and the order in which the trials ran them
    pairs = []
    for name in names:
        m = json.loads((ref_dir / "sweep" / "trials" / name / "manifest.json").read_text())["stages"]
        pairs += [(m[s]["finished_at"], name, s, m[s]["wall_s"]) for s in TRIAL_STAGES]
    pairs.sort()
    order = [(n, s) for _, n, s, _ in pairs]
    duration = {(n, s): w for _, n, s, w in pairs}
    ref_wall = time.monotonic() - t_start

    # Five kills spread over both trials: train and evaluate of the first, select, train and
    # evaluate of the second; each at a seeded fraction of that stage's reference duration.
    rng = random.Random(141)
    first, second = order[0][0], order[-1][0]
    targets = [(first, "train"), (first, "evaluate"), (second, "select"), (second, "train"), (second, "evaluate")]
    assert len(targets) == N_SWEEP_KILLS and all(t in order for t in targets)
    plan = [(t, rng.uniform(0.05, 0.9)) for t in targets]

    cfg = load_config(SMOKE, [f"output.dir={out}", *OVERRIDES, *SWEEP])
    trials = _trials(cfg)
    landed = []
    for (trial, stage), frac in plan:
        d = Driver(out, SWEEP)
        tdir = out / "sweep" / "trials" / trial
        hit = None
        while hit is None:  # the planned trial stage (or a later one, if it already committed) starts
            assert d.proc.poll() is None, f"the run ended before the kill planned in {trial} {stage}: {d.tail()}"
            for n, s in order[order.index((trial, stage)) :]:
                if _stage_started(out / "sweep" / "trials" / n, s, d.start):
                    hit = (n, s)
                    break
            time.sleep(0.05)
        # kill at the planned moment, or right after the stage commits if it is quicker this time
        wake = time.monotonic() + frac * duration[hit]
        while time.monotonic() < wake and _stage_running(out / "sweep" / "trials" / hit[0], hit[1]):
            time.sleep(0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.finish()
        landed.append((*hit, "in" if _stage_running(out / "sweep" / "trials" / hit[0], hit[1]) else "after"))

        # No trial may count as finished (its result.json, for this trial config) unless every one
        # of its stages is committed with the reference's artifact; no committed stage may differ.
        for name, (child, tcfg) in trials.items():
            tdir = out / "sweep" / "trials" / name
            now = _trial_artifacts(tdir)
            for s in TRIAL_STAGES:
                if why_not_done(child, s) is None:
                    assert now[s]() == reference[name][s], (
                        f"kill #{len(landed)} ({landed[-1]}) left {name}/{s} committed with a different artifact"
                    )
            result = tdir / "result.json"
            if result.exists() and json.loads(result.read_text())["trial_hash"] == trial_hash(tcfg):
                assert all(why_not_done(child, s) is None for s in TRIAL_STAGES), (
                    f"kill #{len(landed)} ({landed[-1]}): {name} reported finished with a stage not committed"
                )
        run = Run.open(cfg)
        if why_not_done(run, "sweep") is None:
            assert _trial_set(out) == reference["trials"], f"kill #{len(landed)} ({landed[-1]}) committed another trial set"

    final = Driver(out, SWEEP)
    assert final.finish() == 0, final.tail()
    assert _finished(out, cfg) == reference
    assert all(why_not_done(Run.open(cfg), s) is None for s in SWEEP_STAGES)
    assert all(why_not_done(child, s) is None for child, _ in trials.values() for s in TRIAL_STAGES)
    assert not (out / STAGING).exists() and not any((out / "sweep" / "trials" / n / STAGING).exists() for n in names)
    print(
        f"\nsweep kills: {landed}; reference run {ref_wall:.0f} s, trial stages "
        f"{ {f'{n}/{s}': round(w, 1) for (n, s), w in duration.items()} }, whole test {time.monotonic() - t_start:.0f} s, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    assert len(landed) == N_SWEEP_KILLS and {t for t, _, _ in landed} == set(names)
