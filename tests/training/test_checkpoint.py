"""Checkpoints hold no pickle, and a run killed after a checkpoint resumes to exactly the weights
of an uninterrupted run, for DDP and DeepSpeed ZeRO 0, 2 and 3 (in process, one rank; the Ray runs
with two ranks are in test_train_ray.py). A pickle planted in a checkpoint is refused, never run."""

from __future__ import annotations

import enum
import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
from _ckpt import assert_no_pickle
from safetensors.torch import load_file

from edsft.config import Config
from edsft.errors import UserError
from edsft.training.checkpoint import load_state, save_state
from edsft.training.loop import train_loop


@pytest.fixture(scope="module", autouse=True)
def single_rank_process_group():
    """DeepSpeed outside a launcher (Ray Train sets these) looks for MPI unless told it is rank 0 of 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Stage(enum.IntEnum):
    two = 2


def test_state_round_trips_through_safetensors_and_json(tmp_path):
    tree = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5)},
            1: {"exp_avg": torch.randn(2, 3).to(torch.bfloat16)},
        },
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0, 1], "foreach": None, "fused": False}],
        "stage": Stage.two,
        "$odd": "a key that looks like a marker",
        "nan": float("inf"),
        "shared": [torch.zeros(4)[:2], torch.zeros(0)],
    }
    save_state(tmp_path, "opt", tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.json", "opt.safetensors"]
    back = load_state(tmp_path, "opt")
    assert set(back["state"]) == {0, 1} and back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"]) and back["state"][0]["step"].shape == ()
    assert back["state"][1]["exp_avg"].dtype == torch.bfloat16
    assert back["stage"] == 2 and back["$odd"] == tree["$odd"] and back["nan"] == float("inf")
    assert back["param_groups"][0]["foreach"] is None and back["shared"][1].numel() == 0
    with pytest.raises(TypeError, match=r"at .x\.y is a object: only tensors and JSON values"):
        save_state(tmp_path, "bad", {"x": {"y": object()}})


def _cfg(backend: str, stage: int) -> Config:
    return Config().replace(
        **{
            "training.model": "builtin:tiny-llama",
            "training.backend": backend,
            "training.zero_stage": stage,
            "training.micro_batch_size": 2,
            "training.grad_accum": 2,  # resume lands on an accumulation boundary
            "training.max_steps": 8,
            "training.lr": 1e-2,
            "training.lora_dropout": 0.1,  # dropout draws random numbers: the RNG state must come back too
            "training.checkpoint_every": 4,
            "training.log_every": 4,
            "training.max_seq_len": 64,
        }
    )


ROWS = [{"row_id": f"r{i}", "prompt": f"Is {i} a number?", "response": "yes" if i % 2 else "no", "task": "t"} for i in range(16)]


class Killed(Exception):
    pass


def _kill_at(step_to_kill: int):
    def cb(*, step, rank, metrics, checkpoint_dir):
        if step == step_to_kill:
            raise Killed  # right after the checkpoint of that step was written

    return cb


@pytest.mark.slow
@pytest.mark.parametrize("backend, stage", [("ddp", 0), ("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_a_killed_run_resumes_to_the_same_weights_and_its_checkpoints_hold_no_pickle(tmp_path, backend, stage):
    tc = _cfg(backend, stage).training
    full = train_loop(tc, tc.model, ROWS, checkpoint_dir_fn=lambda s: str(tmp_path / "full" / f"step{s}"))

    with pytest.raises(Killed):
        train_loop(tc, tc.model, ROWS, checkpoint_dir_fn=lambda s: str(tmp_path / "killed" / f"step{s}"), callbacks=[_kill_at(4)])
    ckpt = tmp_path / "killed" / "step4"
    assert_no_pickle(ckpt)
    assert (ckpt / "engine.json").exists() and (ckpt / "rng_rank0.safetensors").exists()
    if stage > 0:
        assert (ckpt / "zero_rank0.safetensors").exists()  # this rank's ZeRO partition
    resumed = train_loop(tc, tc.model, ROWS, resume_from=ckpt, checkpoint_dir_fn=lambda s: str(tmp_path / "resumed" / f"step{s}"))

    assert resumed["resumed_from_steps"] == [4] and resumed["steps"] == full["steps"] == 8
    assert resumed["loss_curve"] == full["loss_curve"]  # the same losses at steps 4 and 8, to the bit
    a = load_file(str(tmp_path / "full" / "step8" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "step8" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for folder in (tmp_path / "full").iterdir():
        assert_no_pickle(folder)


class _Boom:
    """Unpickling this creates a file: proof that a loader ran a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_planted_pickle_is_refused_and_never_run(tmp_path):
    tc = _cfg("deepspeed", 2).training
    with pytest.raises(Killed):
        train_loop(tc, tc.model, ROWS, checkpoint_dir_fn=lambda s: str(tmp_path / f"step{s}"), callbacks=[_kill_at(4)])
    ckpt = tmp_path / "step4"
    marker = tmp_path / "code-ran"
    # what DeepSpeed's own checkpoint looks like, with a payload: whoever can write storage_path could plant it
    (ckpt / "state").mkdir()
    (ckpt / "state" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Boom(marker)))
    (ckpt / "latest").write_text("state")
    resumed = train_loop(tc, tc.model, ROWS, resume_from=ckpt, checkpoint_dir_fn=lambda s: str(tmp_path / "r" / f"step{s}"))
    assert resumed["resumed_from_steps"] == [4] and not marker.exists()  # the edsft files were used, the pickle ignored

    # without edsft's own files, the folder is refused with the reason, and still nothing runs
    (ckpt / "engine.json").unlink()
    with pytest.raises(UserError, match=r"pickle files \['mp_rank_00_model_states.pt'\].*train again with --force"):
        train_loop(tc, tc.model, ROWS, resume_from=ckpt, checkpoint_dir_fn=lambda s: str(tmp_path / "r2" / f"step{s}"))
    assert not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_zero_stage_is_a_clear_error(tmp_path):
    tc = _cfg("deepspeed", 2).training
    with pytest.raises(Killed):
        train_loop(tc, tc.model, ROWS, checkpoint_dir_fn=lambda s: str(tmp_path / f"step{s}"), callbacks=[_kill_at(4)])
    other = _cfg("deepspeed", 0).training
    with pytest.raises(UserError, match="zero_stage=2 on 1 workers, this run has 0 on 1"):
        train_loop(
            other, other.model, ROWS, resume_from=tmp_path / "step4", checkpoint_dir_fn=lambda s: str(tmp_path / "x" / f"step{s}")
        )
    state = json.loads((tmp_path / "step4" / "engine.json").read_text())
    assert state["backend"] == "deepspeed" and state["global_steps"] == 4
