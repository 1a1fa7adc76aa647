"""Quality guard for bf16 training (training.precision: auto on CPUs with native bf16): the same
small LoRA run on SmolLM2-135M in bf16 (bf16 base weights, fp32 adapters and AdamW state, autocast)
ends within 2% of the fp32 run's held-out loss, evaluated in fp32 for both."""

from __future__ import annotations

import pytest

from edsft.config import Config
from edsft.training.evaluation import Evaluator
from edsft.training.loop import train_loop

pytestmark = pytest.mark.slow

COLORS = ["red", "green", "blue", "black", "white", "pink", "brown", "gray"]


def _rows(start: int, n: int) -> list[dict]:
    return [
        {
            "row_id": f"c{i}",
            "prompt": f"Item {i} is {COLORS[i % 8]}. Reply with its colour code.",
            "response": f"COLOUR={COLORS[i % 8].upper()}",
            "task": "colour",
        }
        for i in range(start, start + n)
    ]


def test_bf16_lora_ends_within_two_percent_of_fp32_eval_loss(tmp_path):
    held_out = _rows(1000, 8)
    losses, summaries = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = Config().replace(
            **{
                "training.model": "builtin:smollm2-135m",
                "training.backend": "ddp",
                "training.precision": precision,
                # a short, gentle run that stops mid-way down the loss curve (a run that reaches ~0 loss
                # would make a 2% tolerance meaningless)
                "training.max_steps": 3,
                "training.micro_batch_size": 4,
                "training.lr": 3e-4,
                "training.warmup_ratio": 0.0,
                "training.lora_r": 8,
                "training.max_seq_len": 64,
                "training.log_every": 2,
            }
        )
        folder = tmp_path / precision
        summary = train_loop(cfg.training, cfg.training_model, _rows(0, 16), checkpoint_dir_fn=lambda s: str(folder / f"s{s}"))
        summaries[precision] = summary
        ev = Evaluator(
            "builtin:smollm2-135m",
            str(folder / f"s{summary['steps']}" / "adapter"),
            dtype="float32",
            max_seq_len=64,
            batch_size=8,
        )
        res = ev.losses(held_out, "finetuned")
        losses[precision] = sum(r["loss_sum"] for r in res) / sum(r["n_tokens"] for r in res)
        if precision == "fp32":
            base = ev.losses(held_out, "base")
            losses["base"] = sum(r["loss_sum"] for r in base) / sum(r["n_tokens"] for r in base)
    assert summaries["bf16"]["precision"] == "bf16" and summaries["fp32"]["precision"] == "fp32"
    assert losses["fp32"] < 0.8 * losses["base"], losses  # the run learned something worth comparing
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * losses["fp32"], losses
