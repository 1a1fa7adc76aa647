"""A long trial is not silent: its stages' progress goes to its folder and onto the driver's console.

The trial side (edsft.console's sink + sweep.ProgressFile) with a real LoRA train loop on the tiny
Llama; the driver side (the Tune callback) with a real Console and trial folders on disk."""

from __future__ import annotations

import io
import json
import re
import time
from types import SimpleNamespace

import pytest

from edsft import console
from edsft.config import Config
from edsft.distributed import sweep
from edsft.storage import get_store


@pytest.fixture
def sink():
    """Record what the console's sink hears; removed afterwards."""
    heard = []
    previous = console.set_sink(lambda stage, done, total, unit: heard.append((stage, done, total, unit)))
    yield heard
    console.set_sink(previous)


def test_without_a_console_progress_goes_to_the_sink_with_the_stage(sink):
    console.progress(1, 4, "steps")  # before any stage is named
    console.stage("train")
    console.progress(2, 4, "steps")
    assert sink == [(None, 1, 4, "steps"), ("train", None, None, ""), ("train", 2, 4, "steps")]


def test_an_open_console_takes_progress_and_the_sink_hears_nothing(sink, tmp_path):
    with console.Console(tmp_path / "edsft.log", stream=io.StringIO()) as con:
        con.stage_started("train", "running")
        console.stage("train")
        console.progress(1, 2, "steps")
    assert sink == []


def test_the_train_loop_reports_every_optimizer_step(sink):
    from edsft.training.loop import train_loop

    tc = (
        Config()
        .replace(
            **{
                "training.model": "builtin:tiny-llama",
                "training.backend": "ddp",
                "training.micro_batch_size": 2,
                "training.max_steps": 5,
                "training.log_every": 2,
                "training.max_seq_len": 64,
            }
        )
        .training
    )
    rows = [{"row_id": f"r{i}", "prompt": f"Is {i} even?", "response": "yes" if i % 2 == 0 else "no"} for i in range(8)]
    console.stage("train")
    train_loop(tc, tc.model, rows, checkpoint_dir_fn=lambda s: str(__import__("tempfile").mkdtemp(prefix=f"step{s}-")))
    steps = [(done, total, unit) for stage, done, total, unit in sink if done is not None]
    assert steps == [(s, 5, "steps") for s in range(1, 6)]


def test_progress_file_writes_at_each_stage_start_and_then_at_most_every_few_seconds(tmp_path):
    f = get_store(str(tmp_path)).child("progress.json")
    write = sweep.ProgressFile(f, every=3600)
    write("train", None, None, "")
    first = json.loads((tmp_path / "progress.json").read_text())
    assert first["stage"] == "train" and first["done"] is None
    write("train", 1, 10, "steps")  # within the interval: not written
    assert json.loads((tmp_path / "progress.json").read_text()) == first
    write("evaluate", None, None, "")  # a new stage is written at once
    assert json.loads((tmp_path / "progress.json").read_text())["stage"] == "evaluate"
    now = sweep.ProgressFile(f, every=0)
    now("train", None, None, "")
    now("train", 3, 10, "steps")
    rec = json.loads((tmp_path / "progress.json").read_text())
    assert (rec["stage"], rec["done"], rec["total"], rec["unit"]) == ("train", 3, 10, "steps")
    assert list(tmp_path.iterdir()) == [tmp_path / "progress.json"]  # rewritten whole: no temporary left


def test_progress_text_gives_the_trial_its_stage_count_and_eta():
    t0 = 1000.0
    rec = {"stage": "train", "done": 100, "total": 400, "unit": "steps", "stage_started": t0, "time": t0 + 50}
    # 0.5 s per step so far, 300 steps left: 150 s from its last write, 10 s of which have passed
    assert sweep.trial_progress_text("random-b64-s0", rec, now=t0 + 60) == "random-b64-s0 train 100/400 steps, ETA 2m20s"
    assert sweep.trial_progress_text("a", {**rec, "done": None}) == "a train"
    assert sweep.trial_progress_text("a", {**rec, "done": 400}, now=t0 + 60) == "a train 400/400 steps"
    assert sweep.trial_progress_text("a", None) == "a"


def _trial(name: str, status: str = "RUNNING"):
    return SimpleNamespace(status=status, config={"trial": {"name": name}})


def test_driver_callback_puts_the_running_trials_on_the_console_line(tmp_path):
    run = get_store(str(tmp_path))
    now = time.time()
    rec = {"stage": "train", "done": 10, "total": 20, "unit": "steps", "stage_started": now - 10, "time": now}
    run.child("sweep", "trials", "random-b8-s0", "progress.json").write_json(rec)
    screen = io.StringIO()
    with console.Console(tmp_path / "edsft.log", stream=screen, interval=0.2) as con:
        con.stage_started("sweep", "running")
        cb = sweep._trial_progress(4, run, every=0.0)
        cb.on_step_end(0, [_trial("random-b8-s0"), _trial("k_center-b8-s0"), _trial("random-b16-s0", "TERMINATED")])
        time.sleep(0.6)
        con.stage_finished("sweep: done")
    lines = [l for l in screen.getvalue().splitlines() if "running:" not in l and "trials" in l]
    assert lines, screen.getvalue()
    # the finished trial is not listed; the one without a progress file yet shows its name
    assert re.search(r"0/4 trials.*\); k_center-b8-s0; random-b8-s0 train 10/20 steps, ETA [0-9.]+ s$", lines[-1]), lines
    assert "random-b16-s0" not in lines[-1]


def test_driver_callback_without_a_console_notes_a_line_now_and_then(tmp_path, capsys):
    run = get_store(str(tmp_path))
    cb = sweep._trial_progress(2, run, every=0.0)
    cb.noted = 0.0  # the first poll may note at once
    cb.on_step_end(0, [_trial("random-b8-s0")])
    err = capsys.readouterr().err
    assert "[edsft] sweep: 0/2 trials done; running: random-b8-s0" in err
    cb.on_step_end(1, [_trial("random-b8-s0")])  # within the minute: no second line
    assert capsys.readouterr().err == ""


def _writes_progress(config):
    """A Tune trial that reports like a sweep trial: a progress file in its folder, then a result."""
    from ray import tune

    rec = {"stage": "train", "done": 3, "total": 9, "unit": "steps", "stage_started": time.time() - 3, "time": time.time()}
    get_store(config["run"]).child("sweep", "trials", config["trial"]["name"], "progress.json").write_json(rec)
    time.sleep(4)  # long enough for a few of Tune's loop steps
    tune.report({"ok": 1})


def test_a_real_tune_run_shows_its_running_trial_on_the_console(ray_cluster, tmp_path):
    """Tune itself calls the callback (on_step_end): the console line names the running trial."""
    import sys

    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Tune's trial actors cannot import this module
    run = get_store(str(tmp_path / "run"))
    screen = io.StringIO()
    with console.Console(tmp_path / "edsft.log", stream=screen, interval=0.5) as con:
        con.stage_started("sweep", "running")
        tuner = tune.Tuner(
            tune.with_resources(_writes_progress, {"CPU": 0.5}),
            param_space={"run": run.uri, "trial": tune.grid_search([{"name": "random-b8-s0"}])},
            run_config=tune.RunConfig(
                storage_path=str(tmp_path / "tune"), verbose=0, callbacks=[sweep._trial_progress(1, run, every=0.0)]
            ),
        )
        grid = tuner.fit()
        con.stage_finished("sweep: done")
    assert grid[0].error is None and grid[0].metrics["ok"] == 1
    assert "random-b8-s0 train 3/9 steps" in screen.getvalue(), screen.getvalue()
