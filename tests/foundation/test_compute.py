"""Compute accounting (edsft.compute): per-stage seconds and GPU-seconds, a run's total with the stages
it inherits, the console line. Hand-made manifests with golden numbers; the real run is in
tests/pipeline/test_smoke_pipeline.py."""

from __future__ import annotations

import pytest

from edsft import compute as C
from edsft.config import config_from_dict
from edsft.console import compute_line
from edsft.storage import get_store

GPU_CFG = config_from_dict(
    {
        "scoring": {"num_actors": 4, "num_gpus_per_actor": 0.5},
        "training": {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 1}},
        "evaluation": {"num_actors": 2, "num_gpus_per_actor": 1},
    }
)


def test_wall_time_goes_to_the_stage_kind_and_gpu_seconds_follow_the_config():
    cpu = config_from_dict({})
    assert C.stage_compute("training", 12.5, {"steps": 6}, cpu) == {"compute_s": {"training": 12.5}, "gpu_s": {}}
    assert C.stage_compute(None, 3.0, {}, cpu) == {"compute_s": {}, "gpu_s": {}}  # ingest / annotate: not compute
    # 4 actors x 0.5 GPU, 8 workers x 1 GPU, 2 actors x 1 GPU; selection never holds a GPU
    assert C.stage_compute("scoring", 10.0, {}, GPU_CFG)["gpu_s"] == {"scoring": 20.0}
    assert C.stage_compute("training", 10.0, {}, GPU_CFG)["gpu_s"] == {"training": 80.0}
    assert C.stage_compute("evaluation", 10.0, {}, GPU_CFG)["gpu_s"] == {"evaluation": 20.0}
    assert C.stage_compute("selection", 10.0, {}, GPU_CFG)["gpu_s"] == {}
    # use_gpu without a GPU entry per worker: one GPU each (Ray Train's default)
    assert C.stage_gpus("training", config_from_dict({"training": {"num_workers": 3, "use_gpu": True}})) == 3.0
    # scoring on a GPU cluster with num_gpus_per_actor 0: the plan took one GPU per actor it reports
    assert C.stage_gpus("scoring", config_from_dict({}), {"device": "cuda", "actors": 8}) == 8.0
    assert C.stage_gpus("scoring", config_from_dict({}), {"device": "cpu", "actors": 2}) == 0.0


def test_a_stage_that_splits_its_time_keeps_the_rest_under_its_own_kind():
    # a multi-round selection stage: it scored, selected and trained; 2 s of bookkeeping are its own
    summary = {"compute_s": {"scoring": 30.0, "training": 50.0, "selection": 8.0}, "gpu_s": {"training": 400.0}}
    got = C.stage_compute("selection", 90.0, summary, GPU_CFG)
    assert got["compute_s"] == {"scoring": 30.0, "training": 50.0, "selection": 10.0}
    # training's GPU-seconds as given; scoring's from the config (4 x 0.5 GPU); selection none
    assert got["gpu_s"] == {"scoring": 60.0, "training": 400.0}
    # concurrent parts may add up to more than the wall time: nothing is taken away
    assert C.stage_compute("selection", 5.0, {"compute_s": {"scoring": 9.0}}, None)["compute_s"] == {"scoring": 9.0}
    with pytest.raises(ValueError, match="kinds are"):
        C.stage_compute("selection", 1.0, {"compute_s": {"annotating": 1.0}}, None)
    with pytest.raises(ValueError, match=">= 0"):
        C.stage_compute("selection", 1.0, {"compute_s": {"scoring": -1.0}}, None)


def _manifest(store, stages, **extra):
    store.child("manifest.json").write_json({"config": {}, "stages": stages, **extra})


def _entry(kind, wall, **kw):
    return {"state": "done", "wall_s": wall, "compute": C.stage_compute(kind, wall, {}, None), **kw}


def test_a_trial_total_includes_the_parent_scoring_it_inherits(tmp_path):
    parent, trial = get_store(tmp_path / "run"), get_store(tmp_path / "run" / "sweep" / "trials" / "t")
    _manifest(
        parent,
        {
            "ingest": _entry(None, 4.0),
            "score": _entry("scoring", 40.0),
            # the sweep's own entry sums its trials: never part of one trial's total
            "sweep": {"state": "done", "wall_s": 99.0, "compute": {"compute_s": {"training": 500.0}, "gpu_s": {}}},
        },
    )
    _manifest(
        trial,
        {
            "select": _entry("selection", 1.5),
            "annotate": _entry(None, 0.5),
            "train": _entry("training", 20.0),
            "evaluate": _entry("evaluation", 6.0),
        },
        parent={"run": parent.uri, "inherited": ["ingest", "score"]},
    )
    got = C.run_compute(trial)
    assert got["compute_s"] == {"scoring": 40.0, "selection": 1.5, "training": 20.0, "evaluation": 6.0}
    assert got["total_s"] == 67.5 and got["gpu_total_s"] == 0.0
    assert set(got["inherited"]) == {"ingest", "score"} and set(got["stages"]) == {"select", "annotate", "train", "evaluate"}
    # the parent alone: its scoring plus what its sweep entry says the trials spent
    assert C.run_compute(parent)["total_s"] == 540.0
    cols = C.result_columns(got)
    assert cols["compute_scoring_s"] == 40.0 and cols["compute_total_s"] == 67.5 and cols["gpu_total_s"] == 0.0
    assert C.result_columns(None) == dict.fromkeys(C.COLUMNS + C.GPU_COLUMNS)


def test_manifests_from_before_compute_accounting_count_their_wall_time(tmp_path):
    """A trial committed before this existed: no compute, no parent link; the caller names the parent."""
    parent, trial = get_store(tmp_path / "run"), get_store(tmp_path / "t")
    gpu_config = {"training": {"num_workers": 2, "use_gpu": True}}
    parent.child("manifest.json").write_json({"stages": {"score": {"state": "done", "wall_s": 30.0, "summary": {}}}})
    trial.child("manifest.json").write_json(
        {
            "config": gpu_config,
            "stages": {
                "select": {"state": "done", "wall_s": 2.0, "summary": {}},
                "annotate": {"state": "done", "wall_s": 1.0, "summary": {}},
                "train": {"state": "done", "wall_s": 10.0, "summary": {}},
                "evaluate": {"state": "committing", "wall_s": 5.0, "summary": {}},  # a killed commit counts nothing
            },
        }
    )
    got = C.run_compute(trial, parent=parent, inherited=("ingest", "score"))
    assert got["compute_s"] == {"scoring": 30.0, "selection": 2.0, "training": 10.0, "evaluation": 0.0}
    assert got["gpu_s"]["training"] == 20.0 and got["total_s"] == 42.0
    assert C.run_compute(trial)["total_s"] == 12.0  # without its parent: only its own stages


def test_console_line_states_every_kind_and_gpu_seconds_only_when_spent():
    total = C.add([{"compute_s": {"scoring": 12.34, "training": 75.0}, "gpu_s": {}}])
    assert compute_line(total) == "compute: scoring 12.3 s, selection 0.0 s, training 1m15s, evaluation 0.0 s = 1m27s"
    gpu = C.add([{"compute_s": {"training": 10.0}, "gpu_s": {"training": 80.0}}])
    assert compute_line(gpu).endswith("= 10.0 s; GPU-seconds: training 1m20s = 1m20s")


def test_a_stage_kind_must_be_a_compute_kind():
    from edsft.pipeline import STAGES, Stage

    builtin = ("ingest", "score", "select", "annotate", "train", "evaluate", "sweep", "report")
    assert {n: STAGES[n].kind for n in builtin} == {
        "ingest": None,
        "score": "scoring",
        "select": "selection",
        "annotate": None,
        "train": "training",
        "evaluate": "evaluation",
        "sweep": None,  # its entry holds its trials' compute, from its summary
        "report": None,
    }
    # manifests from before the kinds were declared are read with the same kinds
    assert {n: STAGES[n].kind for n in C._KIND_BEFORE_ACCOUNTING} == C._KIND_BEFORE_ACCOUNTING
    with pytest.raises(ValueError, match="kind='gpu'"):
        Stage("x", (), (), ("x.json",), lambda run, out, progress: {}, kind="gpu")
