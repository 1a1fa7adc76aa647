from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edsft.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", "selection.budget=9"]) == 0
    out = capsys.readouterr().out
    assert "budget: 9" in out and "pool:" in out


def test_bad_config_exits_2_with_readable_message(capsys):
    assert main(["select", "selection.budget=0"]) == 2
    err = capsys.readouterr().err
    assert "selection.budget=0 must be >= 1" in err


def test_python_dash_m_and_jobs_shim_work():
    r = subprocess.run(
        [sys.executable, "-m", "edsft", "config", "show", "-c", "jobs/configs/smoke.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "builtin:tiny-llama" in r.stdout
    r = subprocess.run(
        [sys.executable, "jobs/run_pipeline.py", "--config", "jobs/configs/smoke.yaml", "pool.size=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "pool.size=-1 must be >= 1" in r.stderr


def test_no_verb_prints_help(capsys):
    assert main([]) == 2
    assert "VERB" in capsys.readouterr().out


def test_report_uses_the_config_the_run_ran_with(tmp_path):
    """`edsft report DIR` must not overwrite the run's manifest config with the CLI default."""
    import shutil

    from edsft.config import config_to_dict, load_config
    from edsft.storage import get_store

    cfg = load_config(None, [f"output.dir={tmp_path}", "pool.size=1234", "sweep.budgets=[8, 16]"])
    run = get_store(tmp_path)
    run.child("manifest.json").write_json({"config": config_to_dict(cfg), "stages": {}})
    (tmp_path / "sweep").mkdir()
    shutil.copy(ROOT / "notebooks/example_results.parquet", tmp_path / "sweep/results.parquet")
    assert main(["report", str(tmp_path)]) == 0
    m = run.child("manifest.json").read_json()
    assert m["config"]["pool"]["size"] == 1234 and "report" in m["stages"]
    assert run.child("report/report.md").exists()


def test_sweep_verb_builds_the_pool_and_scores_it_needs(ray_cluster, tmp_path, capsys):
    """`edsft sweep` on a fresh folder runs ingest and score first instead of failing for their
    artifacts (here the sweep itself then refuses export mode, before any trial)."""
    out = tmp_path / "run"
    rc = main(
        [
            "sweep",
            "--config",
            "jobs/configs/smoke.yaml",
            f"output.dir={out}",
            "pool.size=40",
            "pool.eval_size=20",
            "annotation.mode=export",
            "output.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "annotation.mode='export' cannot run a sweep" in err, err[-2000:]
    assert (out / "pool.parquet").exists() and (out / "scores.parquet").exists()
    assert "ingest: running" in err and "score: running" in err
