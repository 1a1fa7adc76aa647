"""The SFT training loop: plain PyTorch, no Ray (edsft.distributed.train wraps it for Ray Train).

Read it top to bottom like nanoGPT's train.py:

1. tokenise the examples with the chat template (response-only loss), optionally pack them;
2. plan the batches: global batch = micro x accumulation x workers (schedule.batch_plan);
3. load the model, add LoRA adapters (or train it all), wrap it in DeepSpeed or DDP (engine.py);
4. resume from a checkpoint folder when given one (weights, optimizer, scheduler, step, RNG);
5. loop over optimizer steps; log every ``log_every`` steps, checkpoint every ``checkpoint_every``;
6. at the end save the adapter as safetensors (+ merged weights if asked) and a summary.

Reporting goes through ``report(metrics, checkpoint_dir_or_None)``, called at the same steps on
every rank (Ray Train's report is a barrier). Checkpoint folders come from ``checkpoint_dir_fn``;
each rank writes its own files into its own folder (DeepSpeed ZeRO shards, RNG state) and the
caller merges them (Ray Train does this when every rank reports its folder).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from edsft import console
from edsft.models import end_of_turn_ids, load_model, load_tokenizer
from edsft.training.data import collate, pack_examples, tokenize_examples
from edsft.training.dropout import use_dropout16
from edsft.training.engine import build_engine, use_bf16
from edsft.training.schedule import batch_plan, micro_batch_indices

__all__ = ["train_loop", "build_model", "Phases", "TRAINER_STATE", "SUMMARY", "ADAPTER_DIR", "MERGED_DIR", "MODEL_DIR"]

TRAINER_STATE = "trainer_state.json"  # step, loss curve, token counts: written by rank 0
SUMMARY = "train_summary.json"  # in the final checkpoint only
ADAPTER_DIR = "adapter"  # final LoRA adapter (safetensors + adapter_config.json + tokenizer)
MODEL_DIR = "model"  # final full weights when lora is false
MERGED_DIR = "merged"  # base + adapter merged, when merge_weights

Report = Callable[[dict, "str | None"], None]


def build_model(
    cfg: Any, model_spec: str, device: torch.device, init_adapter: str | os.PathLike | None = None
) -> torch.nn.Module:
    """The base model on ``device``, with fp32 LoRA adapters (or fully trainable when lora is off).

    ``init_adapter``: a saved LoRA adapter folder to continue training (multi-round selection's
    ``round_training: continue``) instead of fresh adapters."""
    # LoRA in bf16 (GPU, or a CPU with native bf16): frozen base in bf16 (half the memory and traffic,
    # no per-step casts under autocast), trainable adapters and their optimizer state in fp32.
    base_dtype = "bfloat16" if (cfg.lora and use_bf16(cfg.precision, device)) else "float32"
    # eager attention for short CPU sequences (resolve_attention); scoring and evaluation keep sdpa: with
    # bf16 inference eager's bf16 QK^T flipped near-tie greedy tokens (5 of 16 answers vs 4 with sdpa)
    model = load_model(model_spec, dtype=base_dtype, device=device, attention="auto", max_len=cfg.max_seq_len)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora:
        if init_adapter is not None:
            raise ValueError("continuing from an adapter needs training.lora=true (full finetuning has no adapter)")
        return model.train()
    from peft import LoraConfig, get_peft_model

    if init_adapter is not None:
        from peft import PeftModel

        return _fast_lora(PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True), base_dtype, device)

    targets = cfg.lora_target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)  # autocast_adapter_dtype=True keeps the adapters in fp32
    return _fast_lora(model, base_dtype, device)


def _fast_lora(model: torch.nn.Module, base_dtype: str, device: torch.device) -> torch.nn.Module:
    """The peft model in train mode, without two CPU costs: the same math (Dropout16 draws another mask
    from the same seed, with the same distribution)."""
    if base_dtype == "bfloat16":
        # peft casts each LoRA input to the adapter's dtype (bf16 -> fp32), and autocast casts it back to
        # bf16 for the matmul: two copies of every LoRA input, forward and backward, for nothing
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if device.type == "cpu":
        use_dropout16(model)  # torch's CPU dropout mask costs more than the LoRA matmuls it feeds
    return model.train()


def _all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Sum (or mean) a few numbers over ranks; identity outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    backend = dist.get_backend()
    t = torch.tensor(list(values), dtype=torch.float64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t)
    if op == "mean":
        t /= dist.get_world_size()
    return t.tolist()


def _save_rng(folder: Path, rank: int) -> None:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    save_file(state, str(folder / f"rng_rank{rank}.safetensors"))


def _load_rng(folder: Path, rank: int) -> bool:
    path = folder / f"rng_rank{rank}.safetensors"
    if not path.exists():  # e.g. resumed with more workers than before: keep the fresh seed
        return False
    state = load_file(str(path))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def _default_checkpoint_dir(step: int) -> str:
    return tempfile.mkdtemp(prefix=f"edsft-ckpt-{step:06d}-")


def train_loop(
    cfg: Any,
    model_spec: str,
    examples: Sequence[dict],
    *,
    rank: int = 0,
    world_size: int = 1,
    report: Report | None = None,
    resume_from: str | os.PathLike | None = None,
    checkpoint_dir_fn: Callable[[int], str] = _default_checkpoint_dir,
    callbacks: Sequence[Callable[..., None]] = (),
    device: torch.device | str | None = None,
    progress: bool = False,
    phases: Phases | None = None,
    init_adapter: str | os.PathLike | None = None,
) -> dict:
    """Train on ``examples`` (dicts with prompt/response) and return the summary dict.

    ``init_adapter``: a LoRA adapter folder to start from (trained further) instead of fresh adapters.

    ``cfg`` is a :class:`edsft.config.TrainingConfig`. ``callbacks`` are called on every rank
    after each report as ``cb(step=, rank=, metrics=, checkpoint_dir=)`` (fault injection in
    tests, custom logging). The final checkpoint folder holds ``adapter/`` (or ``model/``),
    ``merged/`` when asked, and ``train_summary.json``.

    ``phases`` is a :class:`Phases` timer the caller started (with its own phases marked, e.g. the
    Ray worker's imports and data download); the loop marks its phases on it and the summary
    reports them as ``phases_s`` (seconds per phase, rank 0).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    report = report or (lambda metrics, ckpt: None)
    t_setup = time.time()
    # where a run's fixed cost goes: seconds per phase, in the summary as phases_s
    phases = phases if phases is not None else Phases(t_setup)

    # 1. data ---------------------------------------------------------------------------------
    tokenizer = load_tokenizer(model_spec)
    items, stats = tokenize_examples(tokenizer, examples, cfg.max_seq_len, end_of_turn_ids(tokenizer))
    if not items:
        raise ValueError(
            f"none of the {len(examples)} training examples has a response token within training.max_seq_len={cfg.max_seq_len}: "
            "raise training.max_seq_len or shorten the prompts"
        )
    if cfg.packing:
        items = pack_examples(items, cfg.max_seq_len)
        stats.blocks = len(items)
    phases.mark("tokenize")

    # 2. batches (micro batches grouped by length: little compute on padding) --------------------
    lengths = [len(x["input_ids"]) for x in items]
    plan = batch_plan(
        len(items),
        micro_batch_size=cfg.micro_batch_size,
        grad_accum=cfg.grad_accum,
        world_size=world_size,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_ratio=cfg.warmup_ratio,
    )

    # 3. model + backend (same seed on every rank: identical LoRA init) --------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, model_spec, device, init_adapter)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    phases.mark("model_load")
    engine = build_engine(cfg, model, plan, device, rank, world_size)
    phases.mark("engine_init")
    torch.manual_seed(cfg.seed + 1 + rank)  # per-rank dropout streams

    # 4. resume -----------------------------------------------------------------------------------
    state: dict = {"step": 0, "loss_curve": [], "tokens_seen": 0, "train_time_s": 0.0, "resumed_from_steps": []}
    if resume_from is not None:
        folder = Path(resume_from)
        saved = json.loads((folder / TRAINER_STATE).read_text())
        if saved["plan"]["global_batch"] != plan.global_batch or saved["plan"]["n_items"] != plan.n_items:
            raise ValueError(
                f"checkpoint {folder} was trained with global batch {saved['plan']['global_batch']} on {saved['plan']['n_items']} items, "
                f"this run has {plan.global_batch} on {plan.n_items}: resume with the same data and batch settings or start a new run"
            )
        engine.load(folder)
        _load_rng(folder, rank)
        state = saved["state"]
        state["resumed_from_steps"].append(state["step"])
        phases.mark("resume")

    # 5. train ------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.total_steps, initial=state["step"], desc="train", disable=not (progress and rank == 0))
    window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.time()
    metrics: dict = {}
    step = state["step"]
    while step < plan.total_steps:
        for micro in range(plan.grad_accum):
            idx = micro_batch_indices(plan, step, micro, rank, cfg.seed, lengths)
            batch = collate([items[i] for i in idx], tokenizer.pad_token_id)
            loss, _ = engine.micro_step(batch, micro)
            window_loss += loss
            window_n += 1
            window_tokens += int(batch["attention_mask"].sum())
        grad_norm = engine.optimizer_step()
        step += 1
        bar.update(1)
        if rank == 0:  # the CLI's progress line, or a sweep trial's progress file (no-op otherwise)
            console.progress(step, plan.total_steps, "steps")
        if "first_step" not in phases.seconds:
            phases.mark("first_step")  # includes the one-off costs of the first forward/backward
        final = step == plan.total_steps
        log_now = step % cfg.log_every == 0 or final
        ckpt_now = final or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
        if not (log_now or ckpt_now):
            continue
        # every rank reaches this point at the same steps: the all-reduce and report are collective
        mean_loss, tokens = _all_reduce([window_loss / max(window_n, 1), float(window_tokens)])
        mean_loss /= world_size
        elapsed = time.time() - window_t0
        state["step"] = step
        state["tokens_seen"] += int(tokens)
        state["train_time_s"] += elapsed
        state["loss_curve"].append([step, mean_loss])
        metrics = {
            "step": step,
            "loss": mean_loss,
            "lr": engine.lr(),
            "grad_norm": grad_norm,
            "epoch": step * plan.global_batch / plan.n_items,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
        }
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        window_loss, window_n, window_tokens = 0.0, 0, 0
        ckpt_dir = None
        if ckpt_now:
            ckpt_dir = Path(checkpoint_dir_fn(step))
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            phases.mark("train")
            _save_checkpoint(engine, ckpt_dir, rank, state, plan, stats)
            phases.mark("checkpoint")
            if final:
                summary = _summary(cfg, model_spec, state, plan, stats, n_trainable, n_total, world_size, t_setup, engine.bf16)
                _export_final(cfg, engine, tokenizer, model_spec, ckpt_dir, rank, summary, phases)
        window_t0 = time.time()  # checkpoint time is not training time
        report(metrics, str(ckpt_dir) if ckpt_dir else None)
        if ckpt_dir is not None and not final:
            phases.mark("checkpoint")  # Ray persists the checkpoint inside report
        for cb in callbacks:
            cb(step=step, rank=rank, metrics=metrics, checkpoint_dir=str(ckpt_dir) if ckpt_dir else None)
    bar.close()

    if not metrics:  # resumed from the final checkpoint: nothing to train, export again and report it
        ckpt_dir = Path(checkpoint_dir_fn(step))
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(engine, ckpt_dir, rank, state, plan, stats)
        phases.mark("checkpoint")
        summary = _summary(cfg, model_spec, state, plan, stats, n_trainable, n_total, world_size, t_setup, engine.bf16)
        _export_final(cfg, engine, tokenizer, model_spec, ckpt_dir, rank, summary, phases)
        metrics = {"step": step, "loss": state["loss_curve"][-1][1] if state["loss_curve"] else math.nan}
        report(metrics, str(ckpt_dir))
    return {
        **_summary(cfg, model_spec, state, plan, stats, n_trainable, n_total, world_size, t_setup, engine.bf16),
        **phases.as_dict(),
    }


class Phases:
    """Wall seconds per named phase of a run, each measured from the previous mark (repeats add up).

    ``as_dict`` also gives the absolute start and end (``time.time()``) so that a driver in another
    process can account for what happened before and after (worker group start, teardown, upload).
    """

    def __init__(self, started_at: float):
        self.started_at = self.last = started_at
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> Phases:
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now
        return self

    def as_dict(self) -> dict:
        return {
            "phases_s": {k: round(v, 3) for k, v in self.seconds.items()},
            "phases_started_at": self.started_at,
            "phases_ended_at": self.last,
        }


def _save_checkpoint(engine, folder: Path, rank: int, state: dict, plan, stats) -> None:
    engine.save(folder)  # collective for DeepSpeed
    _save_rng(folder, rank)
    if rank == 0:
        blob = {
            "state": state,
            "plan": plan.as_dict(),
            "data": stats.as_dict(),
            "backend": engine.backend,
            "world_size": plan.world_size,
        }
        (folder / TRAINER_STATE).write_text(json.dumps(blob, indent=2))


def _summary(cfg, model_spec, state, plan, stats, n_trainable, n_total, world_size, t_setup, engine_bf16: bool) -> dict:
    curve = state["loss_curve"]
    return {
        "model": model_spec,
        "steps": state["step"],
        "final_loss": curve[-1][1] if curve else None,
        "first_loss": curve[0][1] if curve else None,
        "loss_curve": curve,
        "tokens_seen": state["tokens_seen"],
        "train_time_s": state["train_time_s"],
        "tokens_per_s": state["tokens_seen"] / state["train_time_s"] if state["train_time_s"] > 0 else None,
        "s_per_step": state["train_time_s"] / state["step"] if state["step"] else None,
        "resumed_from_steps": state["resumed_from_steps"],
        "examples": stats.as_dict(),
        "examples_truncated": stats.truncated,
        "examples_dropped": stats.dropped_no_response,
        "batch": plan.as_dict(),
        "backend": cfg.backend,
        "zero_stage": cfg.zero_stage if cfg.backend == "deepspeed" else None,
        "world_size": world_size,
        "lora": cfg.lora,
        "precision": "bf16" if engine_bf16 else "fp32",
        "threads": torch.get_num_threads(),  # torch threads of the (rank-0) training process
        "trainable_params": n_trainable,
        "total_params": n_total,
        "worker_setup_s": None if t_setup is None else round(time.time() - t_setup - state["train_time_s"], 3),
    }


def _export_final(cfg, engine, tokenizer, model_spec: str, folder: Path, rank: int, summary: dict, phases: Phases) -> None:
    """adapter/ (or model/) as safetensors + tokenizer, merged/ if asked, train_summary.json."""
    full_state = engine.full_state_dict()  # collective under ZeRO-3: every rank calls it
    if rank != 0:
        return
    model = engine.unwrapped()
    target = folder / (ADAPTER_DIR if cfg.lora else MODEL_DIR)
    kwargs = {"state_dict": full_state} if full_state is not None else {}
    model.save_pretrained(str(target), safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(str(target))
    if cfg.lora and cfg.merge_weights:
        # merge into a fresh fp32 copy of the base on CPU, so the training model stays untouched
        from peft import PeftModel

        base = load_model(model_spec, dtype="float32", device="cpu")
        merged = PeftModel.from_pretrained(base, str(target)).merge_and_unload()
        merged.save_pretrained(str(folder / MERGED_DIR), safe_serialization=True)
        tokenizer.save_pretrained(str(folder / MERGED_DIR))
    summary = {**summary, **phases.mark("export").as_dict()}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2))
