"""Training throughput: s/step, tokens/s (and MFU on GPU) for LoRA SFT.

CPU (default): SmolLM2-135M-Instruct + LoRA (r=16, all-linear), in-process loop on 2 threads,
micro batch 8, a synthetic instruction task (~40-60 tokens per example).

GPU (``--gpu``): a 1.1B Llama (TinyLlama-1.1B shape, random weights, bf16 base, fp32 LoRA),
seq 512, Ray Train + DeepSpeed ZeRO-2 on every visible GPU, naive vs optimised:

- naive:     micro batch 1 x accumulation 8, no packing, eager attention, gradient checkpointing
- optimised: micro batch 8 x accumulation 1, packing, SDPA attention, no checkpointing
  (fused AdamW is used on CUDA in both: edsft.training.engine always asks for it there)

MFU = 6 x N_params x tokens/s / peak bf16 FLOP/s (989e12 for an H100 SXM, dense). 6N per token
is the usual forward+backward estimate for full training; with LoRA the frozen weights need no
weight gradients, so the real work is nearer 4N per token and this MFU overstates by ~1.5x.

Usage:
  python benchmarks/training.py                  # CPU numbers -> benchmarks/results/training_cpu.json
  python benchmarks/training.py --gpu            # GPU comparison -> benchmarks/results/training_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
H100_BF16_PEAK = 989e12


def _rows(n: int) -> list[dict]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    rows = []
    for i in range(n):
        seq = [words[(i * 7 + j) % len(words)] for j in range(4 + i % 5)]
        rows.append(
            {
                "row_id": str(i),
                "prompt": "Reverse this list of words: " + " ".join(seq),
                "response": " ".join(reversed(seq)),
                "task": "reverse",
            }
        )
    return rows


def _timed_loop(cfg, model_spec: str, rows: list[dict], world_size: int = 1) -> dict:
    """Run the loop with a report every step; s/step from the report timestamps (first step = warmup)."""
    from edsft.training.loop import train_loop

    stamps: list[tuple[float, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_loop(
            cfg, model_spec, rows, report=lambda m, c: stamps.append((time.time(), m)), checkpoint_dir_fn=lambda s: f"{tmp}/{s}"
        )
    steady = [(t1 - t0) for (t0, _), (t1, _) in zip(stamps[:-2], stamps[1:-1])]  # excludes warmup and the final export
    tokens = [m["tokens_per_s"] for _, m in stamps[1:-1]]
    return {
        "s_per_step": sum(steady) / len(steady),
        "tokens_per_s": sum(tokens) / len(tokens),
        "steps_timed": len(steady),
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
    }


def cpu(steps: int) -> dict:
    import torch

    from edsft.config import Config

    torch.set_num_threads(2)
    cfg = (
        Config()
        .replace(
            **{
                "training.model": "builtin:smollm2-135m",
                "training.backend": "ddp",
                "training.max_steps": steps,
                "training.micro_batch_size": 8,
                "training.log_every": 1,
                "training.max_seq_len": 128,
                "training.warmup_ratio": 0.0,
            }
        )
        .training
    )
    out = {"model": "builtin:smollm2-135m", "lora_r": cfg.lora_r, "micro_batch_size": 8, "threads": 2}
    out.update(_timed_loop(cfg, "builtin:smollm2-135m", _rows(256)))
    return out


def _llama_1b(folder: Path, attn: str) -> str:
    """A TinyLlama-1.1B-shaped model with random weights (bf16) and the tiny-llama tokenizer."""
    import torch
    import transformers

    from edsft.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def gpu(steps: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from edsft.config import Config
    from edsft.distributed.train import train_sft

    n_gpus = torch.cuda.device_count()
    if n_gpus == 0:
        raise SystemExit("--gpu needs CUDA: none visible")
    ray.init(include_dashboard=False)
    work = Path(tempfile.mkdtemp(prefix="edsft-bench-"))
    # long examples so that seq 512 blocks fill up: ~100-token prompts, ~100-token responses
    rows = [
        {
            "row_id": str(i),
            "prompt": " ".join(["context"] * 90) + f" item {i}",
            "response": " ".join(["answer"] * 90),
            "task": "t",
        }
        for i in range(4096)
    ]
    pq.write_table(pa.Table.from_pylist(rows), work / "train.parquet")
    variants = {
        "naive": {"micro": 1, "accum": 8, "packing": False, "attn": "eager", "ckpt": True},
        "optimised": {"micro": 8, "accum": 1, "packing": True, "attn": "sdpa", "ckpt": False},
    }
    results = {}
    for name, v in variants.items():
        spec = _llama_1b(work / f"llama-{v['attn']}", v["attn"])
        cfg = Config().replace(
            **{
                "training.model": spec,
                "training.backend": "deepspeed",
                "training.zero_stage": 2,
                "training.num_workers": n_gpus,
                "training.use_gpu": True,
                "training.resources_per_worker": {"GPU": 1, "CPU": 2},
                "training.max_seq_len": 512,
                "training.micro_batch_size": v["micro"],
                "training.grad_accum": v["accum"],
                "training.packing": v["packing"],
                "training.gradient_checkpointing": v["ckpt"],
                "training.max_steps": steps,
                "training.log_every": 1,
                "training.checkpoint_every": 0,
                "training.warmup_ratio": 0.0,
            }
        )
        s = train_sft(cfg, str(work / "train.parquet"), str(work / f"out-{name}"), progress=False)
        tps = s["tokens_per_s"]
        results[name] = {
            **v,
            "s_per_step": s["s_per_step"],
            "tokens_per_s": tps,
            "total_params": s["total_params"],
            "mfu": 6 * s["total_params"] * tps / (H100_BF16_PEAK * n_gpus),
        }
    return {"gpus": n_gpus, "device": torch.cuda.get_device_name(0), "seq": 512, "variants": results}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the 1.1B Llama Ray Train + DeepSpeed comparison (needs CUDA)")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "load_average": os.getloadavg(),
    }
    result = {**meta, **(gpu(args.steps) if args.gpu else cpu(args.steps))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / ("training_gpu.json" if args.gpu else "training_cpu.json")
    target.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
