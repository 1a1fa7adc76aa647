"""Scoring throughput: rows/s and tokens/s of SmolLM2-135M on CPU, direct and through Ray Data.

    .venv/bin/python benchmarks/scoring.py                 # CPU: direct Scorer + score_pool on 2 CPUs
    .venv/bin/python benchmarks/scoring.py --gpu           # adds the GPU section (needs CUDA)

The direct Scorer (one process, torch's default threads) is the anchor; score_pool runs the same
prompts through Ray Data with fractional-CPU actors of one torch thread each. tokens/s counts
prompt + generated tokens; gen tok/s only the generated ones.

GPU section: a 1B-class Llama with random bf16 weights (SmolLM2's tokenizer), prefill-only
(one forward over the prompts: what embedding-only scoring costs) versus full generation scoring.
MFU = 2 x params x tokens/s / 790e12 (dense bf16 peak used for the table).

Results: benchmarks/results/scoring.md (+ .json), with the machine, the date and the load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
PEAK_FLOPS = 790e12


def prompts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Builtin task prompts (the default pool); templated prompts if that generator is absent."""
    try:
        from edsft.pools.builtin_tasks import generate_tasks

        rows = generate_tasks(n, seed=seed)
        return ([r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows], [r["task"] for r in rows])
    except ImportError:
        rng = np.random.default_rng(seed)
        out = [f"What is {a} plus {b}?" for a, b in rng.integers(0, 999, (n, 2))]
        return out, ["arithmetic"] * n


def machine() -> dict:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m_at_start": os.getloadavg()[0],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def bench_direct(model: str, texts, tasks, max_new_tokens: int, batch_size: int) -> dict:
    from edsft.scoring.scorer import Scorer

    t0 = time.perf_counter()
    scorer = Scorer(model, max_new_tokens=max_new_tokens, batch_size=batch_size)
    load_s = time.perf_counter() - t0
    batch = {
        "row_id": np.array([f"r{i}" for i in range(len(texts))], dtype=object),
        "prompt": np.array(texts, dtype=object),
        "task": np.array(tasks, dtype=object),
    }
    t0 = time.perf_counter()
    out = scorer(batch)
    wall = time.perf_counter() - t0
    pt, rt = int(out["prompt_tokens"].sum()), int(out["response_tokens"].sum())
    return {
        "path": "direct Scorer (1 process)",
        "rows": len(texts),
        "wall_s": round(wall, 2),
        "load_s": round(load_s, 2),
        "rows_per_s": round(len(texts) / wall, 3),
        "tokens_per_s": round((pt + rt) / wall, 1),
        "gen_tokens_per_s": round(rt / wall, 1),
        "prompt_tokens": pt,
        "response_tokens": rt,
    }


def bench_ray(model: str, texts, tasks, max_new_tokens: int, batch_size: int, actors: int) -> dict:
    import ray

    from edsft.config import Config
    from edsft.distributed.scoring import score_pool
    from edsft.storage import get_store

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        n = len(texts)
        pq.write_table(
            pa.table(
                {
                    "row_id": [f"r{i}" for i in range(n)],
                    "prompt": texts,
                    "response": [""] * n,
                    "task": tasks,
                    "source": ["bench"] * n,
                    "line": list(range(n)),
                }
            ),
            f"{tmp}/pool.parquet",
        )
        cfg = Config().replace(
            **{
                "scoring.model": model,
                "scoring.max_new_tokens": max_new_tokens,
                "scoring.batch_size": batch_size,
                "scoring.num_actors": actors,
                "scoring.min_actors": actors,
                "scoring.cpus_per_actor": 0.5,
            }
        )
        s = score_pool(cfg, get_store(f"{tmp}/pool.parquet"), get_store(f"{tmp}/scores"), progress=False)
    ray.shutdown()
    return {
        "path": f"Ray Data score_pool ({actors} actors x 0.5 CPU, 1 thread)",
        "rows": s["rows_in"],
        "wall_s": s["wall_s"],
        "rows_per_s": s["rows_per_s"],
        "tokens_per_s": s["tokens_per_s"],
        "gen_tokens_per_s": s["generated_tokens_per_s"],
        "note": "wall includes actor start + model load",
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_gpu(n_prompts: int, max_new_tokens: int, batch_size: int, device: str = "cuda", tiny: bool = False) -> list[dict]:
    """1B-class random Llama, bf16: prefill-only, then generation scoring with plain generate (the anchor)
    and with the static-cache path in the same run; then SmolLM2-135M both ways (the small-model case).

    `tiny` swaps in a 2-layer model so the code path can be smoke-tested on CPU (numbers meaningless).
    """
    import torch
    import transformers

    from edsft.models import load_tokenizer, resolve_model
    from edsft.scoring.scorer import Scorer

    resolve_model("builtin:smollm2-135m")  # its tokenizer is reused
    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny
        else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    )
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **size,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    texts, tasks = prompts(n_prompts)
    batch = {
        "row_id": np.array([f"r{i}" for i in range(len(texts))], dtype=object),
        "prompt": np.array(texts, dtype=object),
        "task": np.array(tasks, dtype=object),
    }
    rows = []

    def generation_rows(spec: str, label: str, n_params: int, gen_batch: int) -> None:
        speeds = {}
        for mode in ("dynamic", "static"):
            scorer = Scorer(
                spec,
                max_new_tokens=max_new_tokens,
                batch_size=gen_batch,
                dtype="bfloat16" if device == "cuda" else "float32",
                device=device,
                generation=mode,
            )
            scorer(batch)  # warm-up: kernels, allocator, and for static the compiled decode step
            _sync(device)
            t0 = time.perf_counter()
            out = scorer(batch)
            _sync(device)
            wall = time.perf_counter() - t0
            gen = int(out["response_tokens"].sum())
            tot = int(out["prompt_tokens"].sum()) + gen
            speeds[mode] = gen / wall
            anchor = "plain generate (anchor)" if mode == "dynamic" else "static KV cache + compiled step"
            rows.append(
                {
                    "path": f"{label}: generation scoring, {anchor}, batch {gen_batch}",
                    "rows": len(texts),
                    "wall_s": round(wall, 2),
                    "rows_per_s": round(len(texts) / wall, 1),
                    "tokens_per_s": round(tot / wall),
                    "gen_tokens_per_s": round(gen / wall),
                    "mfu": round(2 * n_params * tot / wall / PEAK_FLOPS, 3),
                    "note": "" if mode == "dynamic" else f"{speeds['static'] / speeds['dynamic']:.1f}x plain generate",
                }
            )
            print(rows[-1], flush=True)
            del scorer

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        load_tokenizer("builtin:smollm2-135m").save_pretrained(folder)
        scorer = Scorer(
            folder,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            dtype="bfloat16" if device == "cuda" else "float32",
            device=device,
        )
        ids = [scorer._prompt_ids(t) for t in texts]
        # prefill only: one forward over left-padded prompts
        _sync(device)
        t0 = time.perf_counter()
        ntok = 0
        with torch.inference_mode():
            for s in range(0, len(ids), batch_size):
                chunk = ids[s : s + batch_size]
                width = max(map(len, chunk))
                x = torch.full((len(chunk), width), 2, dtype=torch.long, device=device)
                m = torch.zeros_like(x)
                for i, row in enumerate(chunk):
                    x[i, width - len(row) :] = torch.tensor(row, device=device)
                    m[i, width - len(row) :] = 1
                scorer.model(input_ids=x, attention_mask=m, logits_to_keep=1)
                ntok += sum(map(len, chunk))
        _sync(device)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "path": f"prefill-only, 1B-class ({params / 1e9:.2f}B)",
                "rows": len(ids),
                "wall_s": round(wall, 2),
                "rows_per_s": round(len(ids) / wall, 1),
                "tokens_per_s": round(ntok / wall),
                "mfu": round(2 * params * ntok / wall / PEAK_FLOPS, 3),
            }
        )
        print(rows[-1], flush=True)
        del scorer
        generation_rows(folder, f"1B-class ({params / 1e9:.2f}B)", params, batch_size)
    small = 134_515_008  # SmolLM2-135M parameters (tied embeddings)
    generation_rows("builtin:smollm2-135m", "SmolLM2-135M", small, 8 if tiny else 256)
    return rows


def write_markdown(info: dict, rows: list[dict], args) -> str:
    lines = [
        "# Scoring throughput",
        "",
        f"Date: {info['date']}. Machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"GPU: {info['gpu'] or 'none'}; torch {info['torch']} ({info['torch_threads']} threads). "
        f"1-minute load average at start: {info['load_avg_1m_at_start']:.1f}"
        + (
            " (the machine was shared with other jobs: CPU numbers are pessimistic)"
            if info["load_avg_1m_at_start"] > info["cores"]
            else ""
        )
        + ".",
        "",
        f"Model {args.model}, {args.rows} builtin task prompts, max_new_tokens={args.max_new_tokens}, "
        f"micro-batch {args.batch_size}, greedy, fp32 on CPU. tokens/s = prompt + generated tokens.",
        "",
        "| path | rows | wall s | rows/s | tokens/s | gen tokens/s | MFU | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r.get('rows', '')} | {r.get('wall_s', '')} | {r.get('rows_per_s', '')} | "
            f"{r.get('tokens_per_s', '')} | {r.get('gen_tokens_per_s', '')} | {r.get('mfu', '')} | {r.get('note', '')} |"
        )
    lines += ["", "Reproduce: `.venv/bin/python benchmarks/scoring.py` (add `--gpu` on a CUDA machine).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also run the GPU section (needs CUDA)")
    ap.add_argument("--gpu-rows", type=int, default=512)
    ap.add_argument("--gpu-smoke", action="store_true", help="run the GPU section's code on CPU with a tiny model")
    ap.add_argument("--out", default=str(RESULTS / "scoring"))
    args = ap.parse_args()

    if args.gpu_smoke:  # the GPU section's code, end to end on CPU with a tiny model: no table written
        print(json.dumps(bench_gpu(16, 4, 8, device="cpu", tiny=True), indent=1))
        return
    info = machine()
    texts, tasks = prompts(args.rows)
    rows = [bench_direct(args.model, texts, tasks, args.max_new_tokens, args.batch_size)]
    print(rows[-1], flush=True)
    if not args.skip_ray:
        rows.append(bench_ray(args.model, texts, tasks, args.max_new_tokens, args.batch_size, args.actors))
        print(rows[-1], flush=True)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        rows += bench_gpu(args.gpu_rows, args.max_new_tokens, 64)
    else:
        rows.append({"path": "GPU prefill-only / generation scoring (1B-class, bf16)", "note": "not measured: no GPU lent"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2) + "\n")
    Path(args.out + ".md").write_text(write_markdown(info, rows, args))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
