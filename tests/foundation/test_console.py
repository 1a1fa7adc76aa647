"""The console of a run: a few lines for a person, everything else in <output.dir>/logs/edsft.log."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from edsft import console
from edsft.console import Console, log_path_for, summary_table

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "jobs/configs/smoke.yaml"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fd_level_output_goes_to_the_log_and_console_lines_to_both(tmp_path):
    """What Ray's C++ core, its daemons and forwarded worker logs write (fd 1/2, child processes),
    Python prints and warnings: all in the log, none on the console; edsft's own lines in both."""
    screen = io.StringIO()
    log = tmp_path / "logs" / "edsft.log"
    with Console(log, stream=screen):
        os.write(2, b"raw fd 2 line\n")
        os.write(1, b"raw fd 1 line\n")
        print("a print")
        # a library warning as Python prints it (pytest records warnings.warn() itself)
        print(warnings.formatwarning("a library warning", UserWarning, "lib.py", 1), file=sys.stderr, end="")
        subprocess.run(
            [sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"], check=True
        )
        console.note("ingest: 200 rows")
    text = log.read_text()
    for s in [
        "raw fd 2 line",
        "raw fd 1 line",
        "a print",
        "a library warning",
        "child stdout",
        "child stderr",
        "[edsft] ingest: 200 rows",
    ]:
        assert s in text, s
    assert screen.getvalue() == "[edsft] ingest: 200 rows\n"
    # the descriptors are back: output after the console is no longer captured
    os.write(2, b"after\n")
    assert "after" not in log.read_text()


def test_verbose_shows_the_library_output_live_and_still_logs_it(tmp_path):
    screen = io.StringIO()
    log = tmp_path / "edsft.log"
    with Console(log, stream=screen, verbose=True):
        os.write(2, b"ray internals\n")
        console.note("score: running")
        time.sleep(0.3)  # the tee thread copies the pipe
    assert "ray internals" in screen.getvalue() and "[edsft] score: running" in screen.getvalue()
    assert "ray internals" in log.read_text() and "[edsft] score: running" in log.read_text()


def test_plain_progress_lines_when_not_a_terminal(tmp_path):
    screen = io.StringIO()
    with Console(tmp_path / "edsft.log", stream=screen, interval=0.3) as con:
        con.stage_started("score", "running (config hash abc)")
        for done in range(0, 101, 10):
            console.progress(done, 100, "rows")
            time.sleep(0.1)
        con.stage_finished("score: 100 rows in 1.1 s -> scores.parquet")
    lines = screen.getvalue().splitlines()
    assert lines[0] == "[edsft] score: running (config hash abc)" and lines[-1].startswith("[edsft] score: 100 rows in")
    middle = lines[1:-1]
    assert 1 <= len(middle) <= 6, lines  # periodic, not one per update
    # a loaded machine's tick can land after the last update: 100/100 then has no ETA left to give
    assert all(
        re.match(r"\[edsft\] score: (\d+/100 rows, [0-9.]+ rows/s, ETA [0-9.]+ s|100/100 rows, [0-9.]+ rows/s) \([0-9.]+ s\)$", m)
        for m in middle
    ), middle
    assert "\r" not in screen.getvalue()


def test_one_updating_line_on_a_terminal(tmp_path):
    screen = _Terminal()
    with Console(tmp_path / "edsft.log", stream=screen) as con:
        con.stage_started("sweep", "running (config hash abc)")
        console.progress(3, 8, "trials")
        time.sleep(1.3)  # the ticker redraws once a second
        con.stage_finished("sweep: 8 trials in 2.0 s -> sweep/results.parquet")
    out = screen.getvalue()
    assert out.startswith("\r\x1b[K[edsft] sweep: running (config hash abc)")
    assert "\r\x1b[K[edsft] sweep: 3/8 trials" in out and "ETA" in out
    # what is left on the screen once the \r-redraws are applied: the stage's result, one line
    shown = [re.split(r"\r\x1b\[K", line)[-1] for line in out.split("\n")]
    assert shown == ["[edsft] sweep: 8 trials in 2.0 s -> sweep/results.parquet", ""]


def test_summary_table_aligns_its_columns():
    lines = summary_table(
        [
            {"stage": "ingest", "rows": "200 rows", "wall_s": 1.25, "artifact": "runs/x/pool.parquet"},
            {"stage": "train", "rows": "6 steps", "wall_s": 75.0, "artifact": "runs/x/train"},
            {"stage": "score", "rows": "200 rows", "skipped": True, "artifact": "runs/x/scores.parquet"},
        ]
    )
    assert lines == [
        "  stage       rows     wall  artifact",
        "  ingest  200 rows    1.2 s  runs/x/pool.parquet",
        "  train    6 steps    1m15s  runs/x/train",
        "  score   200 rows  skipped  runs/x/scores.parquet",
    ]


def test_log_path_of_local_and_s3_run_folders(tmp_path):
    assert log_path_for(str(tmp_path / "run")) == tmp_path / "run" / "logs" / "edsft.log"
    s3 = log_path_for("s3://bucket/runs/a")
    assert s3.name == "edsft.log" and s3 == log_path_for("s3://bucket/runs/a") != log_path_for("s3://bucket/runs/b")


def test_log_of_a_remote_run_folder_is_uploaded_on_close(tmp_path):
    """An s3:// run folder's log is written locally, then copied to <run>/logs/edsft.log (any Store)."""
    from edsft.storage import get_store

    target = get_store(tmp_path / "bucket" / "run").child("logs", "edsft.log")
    with Console(tmp_path / "scratch" / "edsft.log", stream=io.StringIO(), upload_to=target):
        os.write(2, b"worker says hi\n")
    assert "worker says hi" in target.read_bytes().decode()


def test_without_a_console_progress_is_silent_and_notes_go_to_stderr(capsys):
    console.progress(1, 2)
    console.note("train: running")
    assert capsys.readouterr().err == "[edsft] train: running\n"


# --------------------------------------------------------------------------------------------
# The smoke run, as a person runs it: `edsft run` in a subprocess
# --------------------------------------------------------------------------------------------


def _edsft(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # its own local cluster, like a person's first run, even while another one (the test
    # session's) runs on this machine: a bare ray.init() would join that one instead
    env["RAY_ADDRESS"] = "local"
    return subprocess.run(
        [sys.executable, "-m", "edsft", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke_console(tmp_path_factory):
    out = tmp_path_factory.mktemp("console_smoke")
    r = _edsft("run", "--config", SMOKE, f"output.dir={out}")
    print(r.stdout + r.stderr)  # shown with -s: what a person sees
    return out, r


@pytest.mark.slow
def test_smoke_run_console_is_short_and_the_rest_is_in_the_log(smoke_console):
    out, r = smoke_console
    console_text = r.stdout + r.stderr
    assert r.returncode == 0, console_text[-3000:]
    lines = console_text.splitlines()
    assert len(lines) < 60, console_text
    for stage in ["ingest", "score", "select", "annotate", "train", "evaluate"]:
        assert sum(bool(re.match(rf"\[edsft\] {stage}: running \(config hash", ln)) for ln in lines) == 1, stage
        assert sum(bool(re.match(rf"\[edsft\] {stage}: .* in [0-9.]+ s -> ", ln)) for ln in lines) == 1, stage
        assert re.search(rf"^  {stage} +\d+ [a-z ]+ +[0-9.ms]+( s)?  {re.escape(str(out))}/", console_text, re.M), stage
    assert re.search(r"^  stage +rows +wall +artifact$", console_text, re.M)
    assert f"metrics: {out}/metrics.json" in console_text and f"log:     {out}/logs/edsft.log" in console_text
    # the run's compute, every kind of it (edsft.compute), on one line
    assert re.search(r"^compute: scoring [0-9.ms]+( s)?, selection .*, training .*, evaluation .* = ", console_text, re.M)
    # none of Ray's internals or the libraries' chatter on the console
    for noise in ["PlacementGroupCleaner", "PreemptionWatcher", "Token authentication", "pid=", "WARNING", "Deprecat"]:
        assert noise not in console_text, noise

    log = (out / "logs" / "edsft.log").read_text()
    # Ray's own output (which lines Ray prints at start-up depends on whether another cluster runs
    # on the machine, e.g. the test session's own: its workers' forwarded lines are always there)
    assert re.search(r"\((RayTrainWorker|TrainController|\w+) pid=\d+", log)
    assert "(RayTrainWorker pid=" in log  # a worker's output, forwarded by Ray to the driver
    assert "FutureWarning" in log  # the libraries' warnings
    assert "[edsft] evaluate: running" in log  # the console's lines are in the log too


@pytest.mark.slow
def test_verbose_shows_ray_and_library_output_live(smoke_console):
    out, _ = smoke_console
    log = out / "logs" / "edsft.log"
    quiet = _edsft("select", "--config", SMOKE, f"output.dir={out}")
    before = len(log.read_text().splitlines())
    loud = _edsft("select", "--config", SMOKE, f"output.dir={out}", "--verbose")
    assert quiet.returncode == loud.returncode == 0, loud.stderr[-2000:]
    q, v = (quiet.stdout + quiet.stderr).splitlines(), (loud.stdout + loud.stderr).splitlines()
    added = [ln for ln in log.read_text().splitlines()[before:] if ln.strip() and not ln.startswith(("[edsft]", "====="))]
    # the start and result lines (plus a progress line per 30 s when the machine is slow), nothing else
    assert len(q) >= 2 and all(ln.startswith("[edsft] select: ") for ln in q), q
    assert "running (config hash" in q[0] and re.search(r" in [0-9.]+ s -> ", q[-1]), q
    # verbose shows live what the quiet console keeps in the log only: every line the loud run
    # added to the log (Ray's start-up lines, when it starts a cluster of its own) is on its console
    shown = "\n".join(v)
    assert len(v) >= len(q) and all(ln.strip() in shown for ln in added), (added, v)


@pytest.mark.slow
def test_a_failing_stage_prints_its_error_and_the_log_path(smoke_console, tmp_path):
    out, _ = smoke_console
    bad = tmp_path / "answers.jsonl"
    bad.write_text('not json\n{"row_id": "nope"}\n')
    r = _edsft("annotate", "--config", SMOKE, f"output.dir={out}", "annotation.mode=import", f"annotation.annotations_path={bad}")
    assert r.returncode == 2
    assert "[edsft] annotate: failed after" in r.stderr
    assert f"edsft: AnnotationError: 32 of the 32 selected row_ids have no usable annotation in {bad}" in r.stderr
    assert f"{out}/logs/edsft.log" in r.stderr and "Traceback" not in r.stderr
