"""CPU throughput of edsft against plain Hugging Face / peft fp32 loops, all in one run.

One run measures, on the same machine and in the same minutes (ratios are what to read: the
machine may be shared, and the load average at the start is in the table):

- the matmul peaks (``torch.mm`` 2048^3, fp32 and bf16, all threads): the physical reference;
- scoring: ``edsft.distributed.scoring.score_pool`` (Ray Data, default config: dtype auto) against a
  plain fp32 batched ``generate`` loop over the same prompts and the same ``max_new_tokens``; and the
  thread layout (one process x all threads against one single-thread process per core);
- LoRA SFT: ``edsft.distributed.train.train_sft`` (Ray Train + DeepSpeed, precision auto) against
  a plain peft fp32 loop over the same examples (random micro batches, full logits), in
  non-padding tokens/s and % of the bf16 peak at 4 x params x tokens/s (LoRA: forward 2N, backward
  to the inputs 2N; no weight gradients for the frozen base);
- evaluation: ``evaluate_models`` (local mode) against plain HF loss + generate loops;
- the fixed per-trial cost of a training run (wall time minus training time: Ray Train controller,
  worker group, DeepSpeed init, model load, export).

``--before DIR`` runs the edsft rows once more from another source tree (e.g. the commit before
this work) in a subprocess, in the same run, so "before / after" share the machine's state.
``--gpu``: the H200 comparison is not implemented for this script yet; the row says "not measured".

Usage:
  python benchmarks/cpu_throughput.py [--quick] [--prompts 300] [--examples 256] [--eval-rows 200] [--before /path/to/tree]
Writes benchmarks/results/cpu_throughput.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
MODEL = "builtin:smollm2-135m"


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    flags = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].split()
                break
        name = next(
            (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
            platform.processor(),
        )
    except OSError:
        name = platform.processor() or platform.machine()
    from edsft.models import cpu_supports_bf16

    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "bf16_flags": [f for f in flags if "bf16" in f or f.startswith("amx")],
        "cpu_supports_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def matmul_peaks(n: int = 2048, reps: int = 5) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm up (oneDNN picks its kernel)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best  # FLOP/s, best of reps (least disturbed by other load)
    return out


# ---------------------------------------------------------------------------------------------
# plain baselines (what a user would write without edsft): fp32, input order, full logits
# ---------------------------------------------------------------------------------------------


def _prompts(n: int) -> tuple[list[str], list[str]]:
    from edsft.pools.builtin_tasks import generate_tasks

    rows = generate_tasks(n, seed=11)
    return [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows], [r["task"] for r in rows]


def plain_generate(texts: list[str], max_new_tokens: int, batch_size: int = 16) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from edsft.models import end_of_turn_ids, load_tokenizer, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    tok = load_tokenizer(MODEL)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen_tokens = prompt_tokens = 0
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            chats = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in texts[s : s + batch_size]
            ]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_of_turn_ids(tok),
                pad_token_id=tok.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            prompt_tokens += int(enc["attention_mask"].sum())
            gen_tokens += int((out.sequences[:, enc["input_ids"].shape[1] :] != tok.pad_token_id).sum())
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "load_s": load_s, "rows": len(texts), "prompt_tokens": prompt_tokens, "response_tokens": gen_tokens}


def _sft_rows(n: int, start: int = 0) -> list[dict]:
    from edsft.pools.builtin_tasks import generate_tasks

    rows = generate_tasks(n + start, seed=7)[start:]
    return [
        {
            "row_id": f"t{i}",
            "prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
            "response": r["output"],
            "task": r["task"],
        }
        for i, r in enumerate(rows)
    ]


def plain_peft_loop(rows: list[dict], micro: int, max_seq_len: int, lr: float) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edsft.models import end_of_turn_ids, load_tokenizer, resolve_model
    from edsft.training.data import IGNORE_INDEX, collate, tokenize_examples

    torch.set_num_threads(os.cpu_count() or 1)
    t_load = time.perf_counter()
    tok = load_tokenizer(MODEL)
    items, _ = tokenize_examples(tok, rows, max_seq_len, end_of_turn_ids(tok))
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    # edsft's default LoRA recipe (r, alpha, dropout, targets): the same math on both sides
    from edsft.config import Config

    t = Config().training
    lora = LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=t.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    load_s = time.perf_counter() - t_load
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    tokens, t0 = 0, time.perf_counter()
    model.train()
    for s in range(0, len(order), micro):
        batch = collate([items[i] for i in order[s : s + micro]], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    wall = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"wall_s": wall, "load_s": load_s, "tokens": tokens, "tokens_per_s": tokens / wall, "params": n_params}


def plain_eval(rows: list[dict], max_new_tokens: int, max_seq_len: int, batch_size: int = 16) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from edsft.models import end_of_turn_ids, load_tokenizer, resolve_model
    from edsft.training.data import IGNORE_INDEX, collate, tokenize_examples

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(MODEL)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    items, _ = tokenize_examples(tok, rows, max_seq_len, end_of_turn_ids(tok))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(items), batch_size):
            b = collate(items[s : s + batch_size], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            F.cross_entropy(logits[:, :-1].float().transpose(1, 2), b["labels"][:, 1:], ignore_index=IGNORE_INDEX)
    loss_s = time.perf_counter() - t0
    gen = plain_generate([r["prompt"] for r in rows], max_new_tokens, batch_size)
    return {"wall_s": loss_s + gen["wall_s"], "rows": len(rows)}


# ---------------------------------------------------------------------------------------------
# edsft
# ---------------------------------------------------------------------------------------------


def _ray_init():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)


def edsft_score(texts, tasks, max_new_tokens: int, tmp: Path, mode: str | None = None) -> dict:
    """``edsft score``'s function on a fresh pool; ``mode``: scoring.mode (None: the tree's default, and
    a tree from before scoring.mode existed always used Ray Data actors). Ray itself is started before
    the clock, as a sweep or ``edsft run`` has it running already."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edsft.config import Config, config_to_dict
    from edsft.distributed.scoring import score_pool
    from edsft.storage import get_store

    _ray_init()
    n = len(texts)
    name = f"pool-{mode or 'default'}"
    pq.write_table(
        pa.table({"row_id": [f"r{i}" for i in range(n)], "prompt": texts, "response": [""] * n, "task": tasks}),
        tmp / f"{name}.parquet",
    )
    overrides = {
        "scoring.model": MODEL,
        "scoring.max_new_tokens": max_new_tokens,
        "scoring.num_actors": 2,
        "scoring.min_actors": 2,
    }
    if mode is not None:
        if "mode" not in config_to_dict(Config())["scoring"]:
            return {}
        overrides["scoring.mode"] = mode
    cfg = Config().replace(**overrides)
    t0 = time.perf_counter()
    s = score_pool(cfg, get_store(str(tmp / f"{name}.parquet")), get_store(str(tmp / f"scores-{name}")), progress=False)
    return {
        "wall_s": time.perf_counter() - t0,
        "rows": s["rows_scored"],
        "dtype": s.get("dtype"),
        "tokens_per_s": s["tokens_per_s"],
        "mode": s.get("mode", "distributed"),
        "actors": s.get("actors"),
        "threads": s.get("threads"),
    }


def _score_worker(args) -> float:
    texts, tasks, max_new_tokens, threads = args
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from edsft.scoring.scorer import Scorer

    scorer = Scorer(MODEL, max_new_tokens=max_new_tokens, num_threads=threads)
    batch = {
        "row_id": np.array([str(i) for i in range(len(texts))], dtype=object),
        "prompt": np.array(texts, dtype=object),
        "task": np.array(tasks, dtype=object),
    }
    t0 = time.perf_counter()
    scorer(batch)
    return time.perf_counter() - t0


def thread_layout(texts, tasks, max_new_tokens: int) -> dict:
    """Scoring wall time (model loaded) for 1 process x all cores against one 1-thread process per core."""
    import multiprocessing as mp

    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = pool.map(_score_worker, [(texts, tasks, max_new_tokens, cores)])[0]
    parts = [(texts[i::cores], tasks[i::cores], max_new_tokens, 1) for i in range(cores)]
    with ctx.Pool(cores) as pool:
        many = max(pool.map(_score_worker, parts))
    return {"one_x_all_threads_s": one, "per_core_single_thread_s": many}


def edsft_train(rows: list[dict], micro: int, max_seq_len: int, lr: float, tmp: Path, threads: int = 2) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edsft.config import Config
    from edsft.distributed.train import train_sft

    if threads > 1:
        _ray_init()  # (one worker trains in-process either way: the single-thread runs skip the cluster)
    pq.write_table(pa.Table.from_pylist(rows), tmp / "annotated.parquet")
    cfg = Config().replace(
        **{
            "training.model": MODEL,
            "training.num_workers": 1,
            "training.resources_per_worker": {"CPU": threads},
            "training.micro_batch_size": micro,
            "training.epochs": 1,
            "training.max_seq_len": max_seq_len,
            "training.lr": lr,
            "training.log_every": 1000,
        }
    )
    t0 = time.perf_counter()
    s = train_sft(cfg, str(tmp / "annotated.parquet"), str(tmp / "train"), progress=False)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "train_time_s": s["train_time_s"],
        "tokens": s["tokens_seen"],
        "tokens_per_s": s["tokens_seen"] / s["train_time_s"],
        "overhead_s": wall - s["train_time_s"],
        "precision": s.get("precision", "fp32"),
        "params": s["total_params"],
        "phases_s": s.get("phases_s"),
        "launcher": {"local": "in-process (training.mode local)", "distributed": "Ray Train"}.get(s.get("mode"), "Ray Train"),
        "threads": s.get("threads"),
    }


def edsft_eval(rows: list[dict], max_new_tokens: int, max_seq_len: int, tmp: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edsft.config import Config
    from edsft.distributed.evaluate import evaluate_models

    pq.write_table(pa.Table.from_pylist(rows), tmp / "eval.parquet")
    cfg = Config().replace(
        **{
            "training.model": MODEL,
            "training.max_seq_len": max_seq_len,
            "evaluation.mode": "local",
            "evaluation.max_new_tokens": max_new_tokens,
        }
    )
    t0 = time.perf_counter()
    m = evaluate_models(cfg, str(tmp / "eval.parquet"), None, str(tmp / "metrics.json"), progress=False)
    return {"wall_s": time.perf_counter() - t0, "rows": m["n"], "dtype": m["settings"].get("dtype", "float32")}


def edsft_rows(args) -> dict:
    """Every edsft measurement (also what --before reruns from another tree)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    texts, tasks = _prompts(args.prompts)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out["score"] = edsft_score(texts, tasks, args.max_new_tokens, tmp)
        out["score_ray"] = edsft_score(texts, tasks, args.max_new_tokens, tmp, mode="distributed")
        out["train"] = edsft_train(_sft_rows(args.examples), 8, args.max_seq_len, 2e-4, tmp)
        out["eval"] = edsft_eval(_sft_rows(args.eval_rows, start=args.examples), args.max_new_tokens, args.max_seq_len, tmp)
    import ray

    ray.shutdown()
    return out


def train_layout(args) -> dict:
    """LoRA SFT as a sweep runs it on a CPU node: one single-thread run per core, side by side (two
    trials of one worker each on 2 cores), each on the same examples. The aggregate rate is the sum of
    the runs' own rates (each measured over its training time, nearly all of it beside the other)."""
    cores = os.cpu_count() or 1
    procs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(cores):
            out = Path(d) / f"run{i}.json"
            cmd = [sys.executable, __file__, "--edsft-only", str(out), "--train-only", "--train-threads=1"]
            cmd += [f"--examples={args.examples}", f"--max-seq-len={args.max_seq_len}"]
            procs.append((subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")), out))
        for proc, _ in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"a side-by-side training run failed (exit {proc.returncode})")
        runs = [json.loads(out.read_text())["train"] for _, out in procs]
    return {
        "runs": len(runs),
        "tokens_per_s": sum(t["tokens_per_s"] for t in runs),
        "per_run_tokens_per_s": [t["tokens_per_s"] for t in runs],
        "train_time_s": max(t["train_time_s"] for t in runs),
        "params": runs[0]["params"],
        "precision": runs[0]["precision"],
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def render(r: dict) -> str:
    m, peak = r["machine"], r["peaks"]
    bf16, fp32 = peak["bf16"], peak["fp32"]
    lines = [
        "# CPU throughput: edsft vs plain fp32 loops (one run)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · bf16 flags {m['bf16_flags'] or 'none'} · torch {m['torch']} · "
        f"load average at start {m['load_avg_at_start']} (1/5/15 min; the machine is shared: read the ratios)",
        "",
        f"Sizes: {r['args']['prompts']} prompts x {r['args']['max_new_tokens']} new tokens; {r['args']['examples']} SFT examples "
        f"(1 epoch, micro batch 8, max_seq_len {r['args']['max_seq_len']}); {r['args']['eval_rows']} eval rows. "
        "The plain loops generate in batches of 16 prompts; edsft in its defaults' (scoring and evaluation: 64).",
        "",
        "| measurement | edsft | plain fp32 loop | ratio | notes |",
        "|---|---|---|---|---|",
        f"| matmul peak 2048^3 | bf16 {bf16 / 1e9:.0f} GFLOP/s | fp32 {fp32 / 1e9:.0f} GFLOP/s | {bf16 / fp32:.1f}x | best of 5 |",
    ]

    def rows_for(tag: str, e: dict) -> None:
        p = r["plain"]["score"]
        prate = p["rows"] / p["wall_s"]
        for label, s in (("", e["score"]), (" through Ray Data (scoring.mode distributed)", e.get("score_ray") or {})):
            if not s:  # a tree from before scoring.mode: its one scoring row is the Ray Data one
                continue
            rate = s["rows"] / s["wall_s"]
            where = (
                f"in-process (scoring.mode {s['mode']}), {s.get('threads') or '?'} threads"
                if s.get("mode") == "local"
                else f"Ray Data, {s.get('actors', 2)} actor(s) x {s.get('threads') or '?'} threads"
            )
            lines.append(
                f"| scoring{label}{tag} (prompts/s, start-up incl.) | {rate:.2f} ({s['tokens_per_s']:.0f} tok/s, {s['dtype']}) | "
                f"{prate:.2f} (model loaded) | {rate / prate:.2f}x | {where}; {s['wall_s']:.1f} s vs {p['wall_s']:.1f} s "
                f"(+ {p['load_s']:.1f} s plain load: {(p['wall_s'] + p['load_s']) / s['wall_s']:.2f}x) |"
            )
        t, pt = e["train"], r["plain"]["train"]
        pct = 4 * t["params"] * t["tokens_per_s"] / bf16 * 100
        ppct = 4 * pt["params"] * pt["tokens_per_s"] / bf16 * 100
        lines.append(
            f"| LoRA SFT{tag} (non-padding tokens/s) | {t['tokens_per_s']:.0f} ({pct:.1f}% of bf16 peak, {t['precision']}) | "
            f"{pt['tokens_per_s']:.0f} ({ppct:.1f}%) | {t['tokens_per_s'] / pt['tokens_per_s']:.2f}x | "
            f"{t.get('launcher', 'Ray Train')} + DeepSpeed; train {t['train_time_s']:.1f} s of {t['wall_s']:.1f} s wall |"
        )
        pload = pt.get("load_s", 0.0)
        lines.append(
            f"| LoRA SFT{tag} end to end (s, start-up incl.) | {t['wall_s']:.1f} | {pt['wall_s']:.1f} (model loaded) | "
            f"{pt['wall_s'] / t['wall_s']:.2f}x | {(pt['wall_s'] + pload) / t['wall_s']:.2f}x with the plain loop's own "
            f"{pload:.1f} s load; edsft {t.get('launcher', 'Ray Train')}, {t.get('threads', '?')} threads |"
        )
        lines.append(f"| fixed per-trial cost{tag} (s) | {t['overhead_s']:.1f} | | | wall minus training time |")
        v, pv = e["eval"], r["plain"]["eval"]
        lines.append(
            f"| evaluation{tag} (rows/s, base model, loss + generation) | {v['rows'] / v['wall_s']:.2f} ({v['dtype']}) | "
            f"{pv['rows'] / pv['wall_s']:.2f} | {(v['rows'] / v['wall_s']) / (pv['rows'] / pv['wall_s']):.2f}x | local mode |"
        )

    rows_for("", r["edsft"])
    if r.get("before"):
        rows_for(" [before]", r["before"])
    lay = r.get("train_layout")
    if lay:
        t, pt = r["edsft"]["train"], r["plain"]["train"]
        pct = 4 * lay["params"] * lay["tokens_per_s"] / bf16 * 100
        each = " + ".join(f"{x:.0f}" for x in lay["per_run_tokens_per_s"])
        lines.append(
            f"| LoRA SFT, {lay['runs']} single-thread runs side by side (a sweep's layout; tokens/s, all runs) | "
            f"{lay['tokens_per_s']:.0f} ({pct:.1f}% of bf16 peak, {lay['precision']}) | {pt['tokens_per_s']:.0f} | "
            f"{lay['tokens_per_s'] / pt['tokens_per_s']:.2f}x | {each} tokens/s; "
            f"{lay['tokens_per_s'] / t['tokens_per_s']:.2f}x the one {t.get('threads', '?')}-thread run above |"
        )
    tl = r.get("threads")
    if tl:
        best = min(tl["one_x_all_threads_s"], tl["per_core_single_thread_s"])
        n, p = r["args"]["prompts"], r["plain"]["score"]
        lines.append(
            f"| scoring, model loaded (prompts/s) | {n / best:.2f} (edsft Scorer, bf16 auto, faster thread layout) | "
            f"{p['rows'] / p['wall_s']:.2f} | {(n / best) / (p['rows'] / p['wall_s']):.2f}x | throughput without start-up |"
        )
        lines.append(
            f"| scoring thread layout (s, model loaded) | 1 process x {m['cores']} threads: {tl['one_x_all_threads_s']:.1f} | "
            f"{m['cores']} processes x 1 thread: {tl['per_core_single_thread_s']:.1f} | "
            f"{tl['per_core_single_thread_s'] / tl['one_x_all_threads_s']:.2f}x | >1: one multi-thread process is faster |"
        )
    lines.append("| H200 (`--gpu`) | not measured | | | no GPU was available to this run |")
    lines.append("")
    return "\n".join(lines)


def overhead_runs(args) -> list[dict]:
    """``--overhead N``: only the LoRA SFT run, N times per tree, after and before alternating.

    Each run is a fresh subprocess (its own Ray cluster, imports and DeepSpeed start-up), like a
    Tune trial's first train call on a node; the order alternates so drifting load hits both trees.
    """
    trees = [("after", Path(__file__).absolute().parents[1])] + (
        [("before", Path(args.before).absolute())] if args.before else []
    )
    runs = []
    for i in range(args.overhead):
        for tag, tree in trees if i % 2 == 0 else trees[::-1]:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = dict(os.environ, PYTHONPATH=str(tree))
                cmd = [
                    sys.executable,
                    __file__,
                    "--edsft-only",
                    f.name,
                    "--train-only",
                    f"--examples={args.examples}",
                    f"--max-seq-len={args.max_seq_len}",
                ]
                load = [round(x, 2) for x in os.getloadavg()]
                # cwd too: Ray workers put the driver's working directory on sys.path ahead of PYTHONPATH
                subprocess.run(cmd, env=env, check=True, cwd=tree)
                train = json.loads(Path(f.name).read_text())["train"]
            runs.append({"tree": tag, "repeat": i, "load_avg_at_start": load, **train})
            print(f"{tag} #{i}: wall {train['wall_s']:.1f} s, fixed {train['overhead_s']:.1f} s, load {load}", flush=True)
    return runs


def _load_caveat(load_1min: float, cores: int) -> str:
    """What the load during the runs means for reading them (other jobs share a small machine)."""
    if load_1min > cores:
        return (
            f"Other jobs shared the machine (1-min load up to {load_1min:.1f} on {cores} cores): single figures "
            "swing by 2x, read the ratios of runs taken side by side."
        )
    return f"1-min load at most {load_1min:.1f} on {cores} cores at the runs' starts (the runs' own load included)."


def render_overhead(r: dict) -> str:
    m, runs = r["machine"], r["runs"]
    phases = list(dict.fromkeys(k for x in runs for k in (x.get("phases_s") or {})))
    lines = [
        "# Fixed per-trial cost of a LoRA SFT run (edsft train, DeepSpeed, 1 worker: Ray Train or in-process)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']} · load average at start {m['load_avg_at_start']} "
        f"(1/5/15 min). {_load_caveat(max(x['load_avg_at_start'][0] for x in runs), m['cores'])}",
        "",
        f"{r['args']['examples']} examples of {MODEL}, 1 epoch, micro batch 8, max_seq_len {r['args']['max_seq_len']}; "
        "each run a fresh process (own Ray cluster). fixed = wall minus training time. "
        "Phases: the train summary's phases_s, empty where a tree predates them; in-process runs have "
        "setup (process group) where Ray Train has worker_start, worker_import and worker_prepare.",
        "",
        "| tree | launcher | run | load (1 min) | wall s | train s | fixed s | " + " | ".join(phases) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(phases),
    ]
    for x in runs:
        ph = x.get("phases_s") or {}
        lines.append(
            f"| {x['tree']} | {x.get('launcher', 'Ray Train')} | {x['repeat']} | {x['load_avg_at_start'][0]} | "
            f"{x['wall_s']:.1f} | {x['train_time_s']:.1f} | "
            f"{x['overhead_s']:.1f} | " + " | ".join(f"{ph[k]:.1f}" if k in ph else "" for k in phases) + " |"
        )
    pairs = [(a, b) for a in runs for b in runs if a["tree"] == "before" and b["tree"] == "after" and a["repeat"] == b["repeat"]]
    if pairs:
        ratios = [a["overhead_s"] / b["overhead_s"] for a, b in pairs]
        lines += [
            "",
            "fixed-cost ratio before/after, per repeat (>1: after is cheaper): " + ", ".join(f"{x:.2f}x" for x in ratios),
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # the end-to-end goals are stated on a few hundred prompts / examples (start-up amortised
    # as in a real run); --quick keeps the small sizes for a fast look
    ap.add_argument("--prompts", type=int, default=None, help="default 300 (--quick: 48)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--examples", type=int, default=None, help="default 256 (--quick: 64)")
    ap.add_argument("--eval-rows", type=int, default=None, help="default 200 (--quick: 32)")
    ap.add_argument("--quick", action="store_true", help="small sizes: 48 prompts, 64 examples, 32 eval rows")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--before", help="another edsft source tree: its edsft rows are measured too, in a subprocess")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-layout measurements")
    ap.add_argument("--gpu", action="store_true", help="the H200 comparison (not implemented: reported as not measured)")
    ap.add_argument(
        "--overhead",
        type=int,
        default=0,
        metavar="N",
        help="only the fixed per-trial cost: N LoRA SFT runs per tree (with --before: before and after alternating); "
        "writes results/cpu_overhead.md",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="results stem without suffix (default benchmarks/results/cpu_throughput; --quick: ..._quick)",
    )
    ap.add_argument("--edsft-only", help=argparse.SUPPRESS)  # internal: write edsft rows to this JSON file
    ap.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # internal: with --edsft-only
    ap.add_argument("--train-threads", type=int, default=2, help=argparse.SUPPRESS)  # internal: with --train-only
    args = ap.parse_args()
    for name, full, quick in (("prompts", 300, 48), ("examples", 256, 64), ("eval_rows", 200, 32)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.edsft_only:
        if args.train_only:
            with tempfile.TemporaryDirectory() as d:
                rows = {"train": edsft_train(_sft_rows(args.examples), 8, args.max_seq_len, 2e-4, Path(d), args.train_threads)}
        else:
            rows = edsft_rows(args)
        Path(args.edsft_only).write_text(json.dumps(rows))
        return
    r: dict = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "edsft_only"}}
    if args.overhead:
        r["runs"] = overhead_runs(args)
        r["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        text = render_overhead(r) + f"\nload average at end: {r['machine']['load_avg_at_end']}\n"
        print(text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu_overhead.md").write_text(text)
        (RESULTS / "cpu_overhead.json").write_text(json.dumps(r, indent=2, default=float))
        return
    print(f"load average at start: {r['machine']['load_avg_at_start']}", flush=True)
    r["peaks"] = matmul_peaks()
    texts, _ = _prompts(args.prompts)
    r["plain"] = {
        "score": plain_generate(texts, args.max_new_tokens),
        "train": plain_peft_loop(_sft_rows(args.examples), 8, args.max_seq_len, 2e-4),
        "eval": plain_eval(_sft_rows(args.eval_rows, start=args.examples), args.max_new_tokens, args.max_seq_len),
    }
    print("plain loops done", flush=True)
    r["edsft"] = edsft_rows(args)
    print("edsft done", flush=True)
    if args.before:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            env = dict(os.environ, PYTHONPATH=str(Path(args.before).absolute()))
            cmd = [sys.executable, __file__, "--edsft-only", f.name] + [
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k in ("prompts", "max_new_tokens", "examples", "eval_rows", "max_seq_len")
            ]
            subprocess.run(cmd, env=env, check=True, cwd=args.before)  # cwd: see overhead_runs
            r["before"] = json.loads(Path(f.name).read_text())
    if not args.no_threads:
        tt, tk = _prompts(args.prompts)
        r["threads"] = thread_layout(tt, tk, args.max_new_tokens)
        r["train_layout"] = train_layout(args)
    r["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = render(r) + f"\nload average at end: {r['machine']['load_avg_at_end']}\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / ("cpu_throughput_quick" if args.quick else "cpu_throughput")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2, default=float))


if __name__ == "__main__":
    main()
