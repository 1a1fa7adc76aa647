"""Fault injection: SIGKILL `edsft run` (smoke config) at random moments in every stage.

An uninterrupted run first measures each stage's duration (from the "<stage>: running" and
"<stage>: ... in X s" log lines). Then 20 kills, drawn with a fixed seed, land at a random
fraction of a stage's measured duration after that stage starts, stages in pipeline order; after
every kill the test checks that each stage the next `run` would skip holds exactly the
reference's artifact, and re-runs. A run that finishes before its planned kill (a resumed stage
can be quicker than the reference's) must equal the reference too, and the kill then goes to a
fresh run folder, so every one of the 20 kills lands. The run that finally completes must equal the reference:
the same row ids in pool, eval split, scores, selection and annotation, a trained adapter and
the same number of eval rows.

The `edsft run` processes join the session's Ray cluster (RAY_ADDRESS, pinned by the fixture),
so a killed driver leaves no cluster behind and a re-run starts in seconds.
"""

from __future__ import annotations

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
from edsft.pipeline import Run, why_not_done

pytestmark = pytest.mark.slow

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

    def __init__(self, out: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edsft", "run", "--config", SMOKE, f"output.dir={out}", *OVERRIDES],
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
    import json

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
    for stage, frac in plan:
        for attempt in range(3):
            d = Driver(out)
            while True:  # wait for the planned stage (or a later one, if the planned one is committed)
                ev = d.next_event()
                if ev is None:
                    break
                _, s, kind = ev
                if kind == "start" and STAGES.index(s) >= STAGES.index(stage):
                    # a retry waits less: the run that outran the last kill may be faster than the
                    # reference's (a resumed stage, a quieter machine)
                    time.sleep(frac * duration[s] * 0.5**attempt)
                    break
            if d.proc.poll() is None:
                break
            # Finished before the kill (a resumed stage, or a machine faster than the reference's
            # run): nothing left to interrupt in this folder. Its finished state must still be the
            # reference's; the kill then goes to a fresh run folder.
            assert d.finish() == 0, d.tail()
            assert {s: get() for s, get in _artifacts(out).items()} == reference
            folders += 1
            out = tmp_path / f"killed-{folders}"
            cfg = load_config(SMOKE, [f"output.dir={out}", *OVERRIDES])
        else:
            pytest.fail(f"three runs in a row finished before the kill planned in {stage}")
        d.proc.send_signal(signal.SIGKILL)
        d.finish()
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
