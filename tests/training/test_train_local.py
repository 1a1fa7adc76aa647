"""training.mode local: the training loop in the calling process, world size 1.

It must be the same training as one Ray Train worker (same loss curve, same adapter), write the
same kind of checkpoints under the same run folder (so each mode resumes the other's), survive an
exception by retrying from its latest checkpoint, survive a killed process by re-running the same
command, and never resume from a checkpoint whose copy did not finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_ray import _cfg, _data

from edsft.config import Config


class FailOnce:
    """Raise right after the checkpoint of ``step``, once: a fault the run retries in-process."""

    def __init__(self, lock: str, step: int = 4):
        self.lock, self.step = lock, step

    def __call__(self, *, step, rank, metrics, checkpoint_dir):
        if step == self.step and checkpoint_dir is not None and not os.path.exists(self.lock):
            Path(self.lock).write_text("failed")
            raise RuntimeError("injected failure after the step-4 checkpoint")


def _local(**over) -> Config:
    return _cfg(**{"training.num_workers": 1, "training.mode": "local", **over})


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_auto_is_local_for_one_cpu_worker_and_local_refuses_a_worker_group():
    assert Config().replace(**{"training.num_workers": 1}).training.resolved_mode == "local"
    assert Config().replace(**{"training.num_workers": 2}).training.resolved_mode == "distributed"
    gpu = Config().replace(**{"training.num_workers": 1, "training.use_gpu": True})
    assert gpu.training.resolved_mode == "distributed"  # Ray Train places a GPU worker on a GPU node
    with pytest.raises(ValueError, match=r"training.mode='local' trains in one process but training.num_workers=2"):
        Config().replace(**{"training.num_workers": 2, "training.mode": "local"})


def test_local_run_retries_from_its_checkpoint_and_keeps_the_newest_two(tmp_path):
    from edsft.distributed.train import LOCAL_CHECKPOINT, train_sft

    data = _data(tmp_path)
    clean = train_sft(_local(), data, str(tmp_path / "clean"), progress=False)
    assert clean["mode"] == "local" and clean["steps"] == 12 and clean["world_size"] == 1
    assert [s for s, _ in clean["loss_curve"]] == [4, 8, 12] and clean["resumed_from_steps"] == []

    lock = str(tmp_path / "failed")
    summary = train_sft(_local(), data, str(tmp_path / "out"), progress=False, callbacks=[FailOnce(lock)])
    assert Path(lock).exists()  # it failed once ...
    assert summary["resumed_from_steps"] == [4]  # ... and the retry loaded the step-4 checkpoint
    assert [s for s, _ in summary["loss_curve"]] == [4, 8, 12]
    # weights, optimizer, scheduler and RNG came back: the same run as the one that never failed
    assert _same(_adapter(tmp_path / "out"), _adapter(tmp_path / "clean"))
    assert summary["loss_curve"] == clean["loss_curve"]
    # checkpoints_to_keep=2: the step-4 checkpoint is gone, 8 and 12 are complete
    run = tmp_path / "out" / summary["run_name"]
    assert sorted(p.name for p in run.iterdir()) == [f"{LOCAL_CHECKPOINT}000008", f"{LOCAL_CHECKPOINT}000012"]
    assert all((run / n / "trainer_state.json").exists() for n in os.listdir(run))

    # no retries left: the failure reaches the caller and nothing is exported
    lock2 = str(tmp_path / "failed2")
    with pytest.raises(RuntimeError, match="injected failure"):
        train_sft(
            _local(**{"training.max_failures": 0}), data, str(tmp_path / "out2"), progress=False, callbacks=[FailOnce(lock2)]
        )
    assert not (tmp_path / "out2" / "train_summary.json").exists()


def test_killed_process_resumes_and_a_half_copied_checkpoint_is_never_loaded(tmp_path):
    """A hard kill after the step-4 checkpoint (os._exit in the training process), then the same
    call again: it continues at step 4. A step-8 folder whose copy stopped before its
    trainer_state.json (the marker written last) is there too and must be ignored."""
    from edsft.distributed.train import LOCAL_CHECKPOINT, run_name_for, train_sft
    from edsft.training.data import load_examples

    data, out = _data(tmp_path), tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parent.parent)]!r}
        from test_train_ray import KillOnce
        from test_train_local import _local
        from edsft.distributed.train import train_sft
        train_sft(_local(), {data!r}, {str(out)!r}, progress=False, callbacks=[KillOnce({str(tmp_path / "killed")!r}, rank=0)])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    run = out / run_name_for(_local(), load_examples(data))
    assert sorted(p.name for p in run.iterdir()) == [f"{LOCAL_CHECKPOINT}000004"]
    assert not (out / "train_summary.json").exists()

    # a copy of step 4 dressed up as step 8 without its marker: what a crash mid-copy leaves
    partial = run / f"{LOCAL_CHECKPOINT}000008"
    partial.mkdir()
    for f in (run / f"{LOCAL_CHECKPOINT}000004").iterdir():
        if f.is_file() and f.name != "trainer_state.json":
            (partial / f.name).write_bytes(f.read_bytes())

    summary = train_sft(_local(), data, str(out), progress=False)
    assert summary["resumed_from_steps"] == [4] and summary["steps"] == 12
    assert (partial / "trainer_state.json").exists()  # replaced by the real step-8 checkpoint
    assert json.loads((partial / "trainer_state.json").read_text())["state"]["step"] == 8
    again = train_sft(_local(), data, str(out), progress=False)
    assert again["skipped"] is True


def test_local_timeline_adds_up_to_the_wall_time(tmp_path):
    from edsft.distributed.train import train_sft

    summary = train_sft(
        _local(**{"training.max_steps": 4, "training.checkpoint_every": 2, "training.log_every": 2}),
        _data(tmp_path, n=16),
        str(tmp_path / "out"),
        progress=False,
    )
    phases = summary["phases_s"]
    timeline = ["driver_prepare", "setup", "tokenize", "model_load", "engine_init", "first_step", "train", "checkpoint"]
    assert list(phases) == [*timeline, "export", "finish", "upload"], phases
    assert all(v >= 0 for v in phases.values()), phases
    assert abs(sum(phases.values()) - summary["wall_time_s"]) < 0.5, (sum(phases.values()), summary["wall_time_s"])
    assert summary["threads"] == 1  # training.resources_per_worker.CPU of the test config
    assert torch.get_num_threads() >= 1 and "LOCAL_RANK" not in os.environ  # the caller's process is left as it was


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "ddp"])
def test_local_is_the_same_training_as_one_ray_train_worker(ray_cluster, tmp_path, backend):
    """Parity: one Ray Train worker and the local loop, same config and data, same numbers; and a run
    killed in distributed mode continues in local mode from the Ray checkpoint (one run folder)."""
    from edsft.distributed.train import train_sft

    data = _data(tmp_path)
    cfg = _cfg(**{"training.num_workers": 1, "training.backend": backend})
    local = train_sft(cfg.replace(**{"training.mode": "local"}), data, str(tmp_path / "local"), progress=False)
    # a sweep trial's progress file hears the steps from the Ray Train worker too (rank 0 gets the sink)
    from edsft import console
    from edsft.distributed.sweep import ProgressFile
    from edsft.storage import get_store

    previous = console.set_sink(ProgressFile(get_store(str(tmp_path / "progress.json")), every=0))
    try:
        console.stage("train")
        ray_run = train_sft(cfg.replace(**{"training.mode": "distributed"}), data, str(tmp_path / "ray"), progress=False)
    finally:
        console.set_sink(previous)
    prog = json.loads((tmp_path / "progress.json").read_text())
    assert (prog["stage"], prog["done"], prog["total"], prog["unit"]) == ("train", ray_run["steps"], ray_run["steps"], "steps")
    assert (local["mode"], ray_run["mode"]) == ("local", "distributed")
    assert local["run_name"] == ray_run["run_name"]  # the mode is how, not what: the same run
    assert [s for s, _ in local["loss_curve"]] == [s for s, _ in ray_run["loss_curve"]]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(local["loss_curve"], ray_run["loss_curve"]))
    assert _same(_adapter(tmp_path / "local"), _adapter(tmp_path / "ray"), atol=1e-6)
    assert "worker_start" in ray_run["phases_s"] and "worker_start" not in local["phases_s"]

    if backend != "deepspeed":
        return
    from ray.train import TrainingFailedError
    from test_train_ray import KillOnce

    lock, out = str(tmp_path / "killed"), tmp_path / "mixed"
    with pytest.raises(TrainingFailedError):
        train_sft(
            cfg.replace(**{"training.mode": "distributed", "training.max_failures": 0}),
            data,
            str(out),
            progress=False,
            callbacks=[KillOnce(lock, rank=0)],
        )
    mixed = train_sft(cfg.replace(**{"training.mode": "local"}), data, str(out), progress=False)
    assert mixed["resumed_from_steps"] == [4] and mixed["mode"] == "local"
    assert _same(_adapter(out), _adapter(tmp_path / "local"), atol=1e-6)
