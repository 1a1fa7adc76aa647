"""Stage commits: staging, the manifest as commit marker, inventories, failed stages, input fingerprints.

Built-in ingest runs in-process (no Ray), so most of these take a second; the file-pool cases use
the session's real 2-CPU Ray cluster (file pools are ingested with one Ray task per file).
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow.parquet as pq
import pytest

from edsft.cli import main
from edsft.config import load_config
from edsft.errors import UserError
from edsft.pipeline import STAGING, ManifestError, Run, StageNotBuilt, _impl, run_pipeline, run_stage, why_not_done
from edsft.storage import get_store

SMOKE = "jobs/configs/smoke.yaml"


def _cfg(out, *overrides):
    return load_config(SMOKE, [f"output.dir={out}", "output.progress=false", "pool.size=60", "pool.eval_size=20", *overrides])


def test_ingest_commits_outputs_and_records_their_inventory(tmp_path):
    cfg = _cfg(tmp_path)
    entry = run_stage(cfg, "ingest")
    m = json.loads((tmp_path / "manifest.json").read_text())["stages"]["ingest"]
    assert m["state"] == "done" and set(m["inventory"]) == {"pool.parquet", "eval.parquet", "quarantine.jsonl"}
    assert m["inventory"]["pool.parquet"]["rows"] == pq.read_table(tmp_path / "pool.parquet").num_rows == 60
    assert m["inventory"]["eval.parquet"]["rows"] == 20
    assert not (tmp_path / STAGING).exists() and not (tmp_path / "_ingest_tmp").exists()
    # summaries point at the committed files, never at the staging folder
    assert entry["summary"]["quarantine_path"] == str(tmp_path / "quarantine.jsonl")
    assert why_not_done(Run.open(cfg), "ingest") is None


def test_artifact_changed_after_commit_is_not_taken_for_done(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    run_stage(cfg, "ingest")
    parts = sorted((tmp_path / "pool.parquet").glob("*.parquet"))
    t = pq.read_table(parts[0])
    pq.write_table(t.slice(0, 7), parts[0])  # a partial artifact where the committed one was
    why = why_not_done(Run.open(cfg), "ingest")
    assert why is not None and "holds 7 rows, the commit recorded 60" in why
    res = run_pipeline(cfg, stages=["ingest"])
    assert not res["ingest"].get("skipped") and "runs again" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "pool.parquet").num_rows == 60
    assert run_pipeline(cfg, stages=["ingest"])["ingest"].get("skipped")


def test_a_commit_that_did_not_finish_is_run_again_and_blocks_downstream(tmp_path):
    cfg = _cfg(tmp_path)
    run_stage(cfg, "ingest")
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["stages"]["ingest"]["state"] = "committing"  # what a kill between the move and the record leaves
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert "did not commit" in why_not_done(Run.open(cfg), "ingest")
    # a single verb does not read an upstream artifact whose commit is missing
    assert main(["score", "--config", SMOKE, f"output.dir={tmp_path}", "pool.size=60", "pool.eval_size=20"]) == 2
    assert not (tmp_path / "scores.parquet").exists()
    assert not run_pipeline(cfg, stages=["ingest"])["ingest"].get("skipped")


def test_upstream_built_with_another_config_is_refused(tmp_path, capsys):
    run_stage(_cfg(tmp_path), "ingest")
    with pytest.raises(UserError, match=r"needs the 'ingest' stage's outputs.*config or the input files changed.*edsft ingest"):
        run_stage(_cfg(tmp_path, "pool.seed=5"), "score")


def test_damaged_manifest_names_its_path_and_the_fix(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    run_stage(cfg, "ingest")
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])  # truncated mid-write by an old edsft
    with pytest.raises(ManifestError):
        run_pipeline(cfg, stages=["ingest"])
    assert main(["ingest", "--config", SMOKE, f"output.dir={tmp_path}", "pool.size=60", "pool.eval_size=20"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "manifest.json") in err and "is damaged" in err and "Move it aside" in err
    assert "Traceback" not in err


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_failed_ingest_leaves_no_pool_and_keeps_its_quarantine(ray_cluster, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    _jsonl(pool, [{"instruction": f"q{i}", "output": "a"} for i in range(3)] + [{"nope": i} for i in range(9)])
    out = tmp_path / "run"
    args = ["--config", SMOKE, f"output.dir={out}", f"pool.path={pool}", "pool.eval_fraction=0.2"]
    assert main(["ingest", *args]) == 2
    err = capsys.readouterr().err
    assert "more than pool.max_bad_fraction" in err and str(out / "quarantine.jsonl") in err
    assert (out / "quarantine.jsonl").exists() and len((out / "quarantine.jsonl").read_text().splitlines()) == 9
    for left in ("pool.parquet", "eval.parquet", "_ingest_tmp", STAGING):
        assert not (out / left).exists(), left
    assert main(["score", *args]) == 2  # nothing to score: missing input, not a score of a partial pool
    err = capsys.readouterr().err
    assert f"needs {out / 'pool.parquet'}, which does not exist: run `edsft ingest`" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_sigkilled_ingest_of_many_files_is_never_scored(ray_cluster, tmp_path, capsys):
    """The issue's case: `edsft ingest` of 300 one-row files (one Ray task per file, each writing its
    part) killed while the parts arrive; what it wrote is not a pool any later stage reads."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(300):
        _jsonl(pool / f"f{i:03d}.jsonl", [{"instruction": f"question {i}", "output": f"a{i}"}])
    out = tmp_path / "run"
    args = ["--config", SMOKE, f"output.dir={out}", f"pool.path={pool}", "pool.eval_size=0", "output.progress=false"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "edsft", "ingest", *args], cwd=root, stderr=subprocess.PIPE, text=True)
    parts, deadline = out / STAGING / "ingest" / "pool.parquet", time.monotonic() + 300
    while len(list(parts.glob("*.parquet"))) < 20:  # some tasks have written their parts, not all
        assert proc.poll() is None, f"ingest ended before the kill: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no part written in 5 minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    written = len(list(parts.glob("*.parquet")))
    assert 20 <= written < 300 and not (out / "pool.parquet").exists()
    cfg = load_config(SMOKE, args[2:])
    assert why_not_done(Run.open(cfg), "ingest") == "never ran"
    assert main(["score", *args]) == 2 and not (out / "scores.parquet").exists()
    assert "needs" in capsys.readouterr().err
    assert main(["ingest", *args]) == 0  # the re-run starts over: every file, each row once
    ids = pq.read_table(out / "pool.parquet", columns=["row_id"])["row_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 300 and why_not_done(Run.open(cfg), "ingest") is None


def test_editing_a_pool_file_in_place_invalidates_ingest(tmp_path):
    pool = tmp_path / "pool.jsonl"
    _jsonl(pool, [{"instruction": f"q{i}", "output": "a"} for i in range(5)])
    cfg = _cfg(tmp_path / "run", f"pool.path={pool}")
    before = Run.open(cfg).hash("ingest")
    assert Run.open(cfg).hash("ingest") == before  # stable while nothing changes
    st = pool.stat()
    _jsonl(pool, [{"instruction": f"q{i}", "output": "b"} for i in range(5)])  # same size
    os.utime(pool, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only the content tells
    assert pool.stat().st_size == st.st_size
    after = Run.open(cfg).hash("ingest")
    assert after != before
    (tmp_path / "extra.jsonl").write_text("")
    folder = _cfg(tmp_path / "run", f"pool.path={tmp_path}")
    h = Run.open(folder).hash("ingest")
    (tmp_path / "more.jsonl").write_text('{"instruction": "x", "output": "y"}\n')  # a new file in a folder pool
    assert Run.open(folder).hash("ingest") != h


def test_only_a_missing_optional_dependency_is_not_available(tmp_path, monkeypatch):
    (tmp_path / "stage_needs_torch.py").write_text("import torch\nrun = None\n")
    (tmp_path / "stage_with_a_bug.py").write_text("from edsft.no_such_module import run\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(StageNotBuilt, match="needs 'torch'"):
        _impl("stage_needs_torch", "run", "score")
    with pytest.raises(ModuleNotFoundError, match="edsft.no_such_module"):  # a bug surfaces as itself
        _impl("stage_with_a_bug", "run", "score")


def test_cli_user_error_exits_2_and_a_bug_exits_1_with_traceback(monkeypatch, capsys):
    from edsft import pipeline

    def user_error(cfg, name, **kw):
        raise UserError("selection.budget=7 is odd: pick an even budget")

    monkeypatch.setattr(pipeline, "run_stage", user_error)
    assert main(["select"]) == 2
    err = capsys.readouterr().err
    assert "selection.budget=7 is odd" in err and "Traceback" not in err

    def bug(cfg, name, **kw):
        raise ValueError("index out of range in a helper")  # a ValueError that is no user's fault

    monkeypatch.setattr(pipeline, "run_stage", bug)
    assert main(["select"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "index out of range" in err


def test_store_writes_are_whole_and_leave_no_temporary_files(tmp_path):
    s = get_store(tmp_path).child("a", "m.json")
    s.write_json({"x": 1})
    s.write_json({"x": 2})
    assert s.read_json() == {"x": 2} and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.json"]


def test_commit_on_s3_has_no_staging_left_and_checks_row_counts(monkeypatch):
    """The same commit on a real S3 protocol endpoint (moto server): S3 has no rename, the
    manifest record after the copy is the commit."""
    from _s3 import moto_s3

    from edsft.storage import set_default_storage

    env = {"AWS_ACCESS_KEY_ID": "AKIAEDSFTCOMMIT0001", "AWS_SECRET_ACCESS_KEY": "commit-test-secret"}
    with moto_s3(env) as s3:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint_url"])  # restored after the test
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3["client"].create_bucket(Bucket="runs")
        cfg = _cfg("s3://runs/r1", f"storage.endpoint_url={s3['endpoint_url']}", "storage.region=us-east-1")
        try:
            run_stage(cfg, "ingest")
            keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket="runs")["Contents"]]
            assert not [k for k in keys if STAGING in k or "_ingest_tmp" in k], keys
            run = Run.open(cfg)
            inv = run.manifest()["stages"]["ingest"]["inventory"]
            assert inv["pool.parquet"]["rows"] == 60 and why_not_done(run, "ingest") is None
            part = run.path("pool.parquet").parquet_files()[0]
            partial = pq.read_table(part, filesystem=run.store.fs).slice(0, 7)
            pq.write_table(partial, part, filesystem=run.store.fs)
            assert "holds 7 rows, the commit recorded 60" in why_not_done(Run.open(cfg), "ingest")
            assert not run_pipeline(cfg, stages=["ingest"])["ingest"].get("skipped")
            assert why_not_done(Run.open(cfg), "ingest") is None
        finally:
            set_default_storage(None, None)


def test_overwriting_an_s3_pool_object_within_its_second_invalidates_ingest(monkeypatch):
    """S3's LastModified has whole seconds: two PUTs of the same size in one second differ only in
    their ETag, which the fingerprint lists."""
    from _s3 import moto_s3

    from edsft.storage import set_default_storage

    env = {"AWS_ACCESS_KEY_ID": "AKIAEDSFTETAG0001", "AWS_SECRET_ACCESS_KEY": "etag-test-secret"}

    def body(answer):
        return "".join(json.dumps({"instruction": f"q{i}", "output": answer}) + "\n" for i in range(5)).encode()

    with moto_s3(env) as s3:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint_url"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        c = s3["client"]
        c.create_bucket(Bucket="pools")
        cfg = _cfg(
            "/unused",
            "pool.path=s3://pools/p/pool.jsonl",
            "pool.prompt_field=instruction",
            "pool.response_field=output",
            f"storage.endpoint_url={s3['endpoint_url']}",
            "storage.region=us-east-1",
        )
        try:
            for _ in range(5):  # until both PUTs fall in one second
                c.put_object(Bucket="pools", Key="p/pool.jsonl", Body=body("a"))
                before, first = Run.open(cfg).hash("ingest"), c.head_object(Bucket="pools", Key="p/pool.jsonl")
                c.put_object(Bucket="pools", Key="p/pool.jsonl", Body=body("b"))  # same size, other content
                second = c.head_object(Bucket="pools", Key="p/pool.jsonl")
                if first["LastModified"] == second["LastModified"]:
                    break
            assert (first["LastModified"], first["ContentLength"]) == (second["LastModified"], second["ContentLength"])
            assert Run.open(cfg).hash("ingest") != before
            assert Run.open(cfg).hash("ingest") == Run.open(cfg).hash("ingest")  # stable while nothing changes
        finally:
            set_default_storage(None, None)


def test_an_artifact_left_by_an_earlier_commit_is_not_read_downstream(ray_cluster, tmp_path):
    """annotate in oracle mode writes annotated.parquet; annotate in export mode (real annotators)
    writes to_annotate.* and leaves that file alone (it deletes nothing annotators may be filling in).
    Training must then refuse the oracle labels: they are not the annotate stage's last commit."""
    cfg = _cfg(tmp_path, "selection.budget=8")
    for stage in ("ingest", "score", "select", "annotate"):
        run_stage(cfg, stage)
    assert (tmp_path / "annotated.parquet").exists()
    export = _cfg(tmp_path, "selection.budget=8", "annotation.mode=export")
    run_stage(export, "annotate")
    assert (tmp_path / "to_annotate.jsonl").exists() and (tmp_path / "annotated.parquet").exists()
    with pytest.raises(UserError, match=r"annotated\.parquet, but the 'annotate' stage's last commit did not produce it.*import"):
        run_stage(export, "train")
    assert not (tmp_path / "train").exists()
