"""The two training backends behind one small interface: DeepSpeed (ZeRO 0-3) and torch DDP.

An :class:`Engine` owns the (wrapped) model, the optimizer and the lr scheduler and knows how to
run one micro batch forward+backward, take an optimizer step, save/load a resumable checkpoint
and export the final weights. The training loop (loop.py) is then the same for both backends.

Precision: ``precision: auto`` is bf16 on GPU and on CPUs with native bf16 matmuls
(edsft.models.cpu_supports_bf16: AVX512-BF16 / AMX / Arm BF16), fp32 elsewhere. In bf16 the frozen
base weights are bf16, LoRA adapters (or the full model when ``lora: false``) and the optimizer state
stay fp32, and forward runs under ``torch.autocast(bf16)`` - the same for both backends, so
DeepSpeed's own fp16/bf16 modes are not used. The loss is computed in fp32.

Logits only where the loss needs them: the model's own LM head runs on no position at all
(``logits_to_keep`` an empty index); the final hidden states are captured at the decoder's norm and the head is
applied to the response positions alone (:func:`response_logits`). With SmolLM2's 49k-token head
over every prompt token that was a large share of each step's FLOPs and memory traffic.
Checkpoints hold no pickle (checkpoint.py: safetensors + JSON), because they are read back from
``training.storage_path``, which may be a shared bucket, and unpickling runs code. Rank 0 writes the
trainable weights (``trainable.safetensors``; LoRA adapters only, frozen base weights are not
saved), the scheduler and step counters (``engine.json``) and, for DDP and ZeRO-0, the optimizer
state (ranks hold identical copies). Under ZeRO 1-3 each rank writes its own optimizer partition
and fp32 master weights (``zero_rank<r>``) from DeepSpeed's own state dict, and loads it back
through DeepSpeed's ``load_state_dict``; DeepSpeed's ``save_checkpoint``/``load_checkpoint`` are not
used, since ``load_checkpoint`` unpickles with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edsft.errors import UserError
from edsft.models import cpu_supports_bf16
from edsft.training.checkpoint import load_state, save_state
from edsft.training.data import IGNORE_INDEX
from edsft.training.schedule import BatchPlan, lr_factor

__all__ = ["Engine", "build_engine", "logits_at", "response_loss", "response_logits", "use_bf16"]

TRAINABLE = "trainable.safetensors"  # trainable weights (rank 0)
ENGINE_STATE = "engine"  # engine.json: scheduler + counters (rank 0)
OPTIMIZER_STATE = "optimizer"  # optimizer.{safetensors,json}: DDP / ZeRO-0 (rank 0)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())  # auto


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over response tokens (labels != IGNORE_INDEX) and their count.

    ``logits`` is [B, T, V] aligned with ``labels`` [B, T] (shifted here), or [N, V] for the N
    response positions already gathered by :func:`response_logits` with ``labels`` their targets [N].
    """
    if logits.dim() == 3:
        logits, labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
    n = int((labels != IGNORE_INDEX).sum())
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum / max(n, 1), n


class _FinalHidden:
    """Forward hook on the decoder's final norm: keeps its output (the states the LM head reads)."""

    def __init__(self, module: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output[0] if isinstance(output, tuple) else output

    def remove(self):
        self._handle.remove()


def _head_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(final norm, LM head) of a Llama-like causal LM (also inside peft / DeepSpeed / DDP wrappers)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DeepSpeed / DDP
        model = model.module
    if hasattr(model, "peft_config"):  # peft: the transformers model under the adapters
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = getattr(decoder, "norm", None)
    if norm is None or head is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return norm, head


def response_logits(
    module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, V] at the N positions whose next token is a response label, their targets [N] and rows [N].

    ``module`` is called (so DeepSpeed / DDP hooks run) with ``logits_to_keep`` an empty index (its own
    LM head computes nothing); the head is then applied to the gathered response positions only. Models without a Llama-like final norm
    fall back to full logits, gathered the same way: the numbers are identical either way.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # [B, T-1]: position t predicts labels[t + 1]
    keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)  # the last position predicts nothing
    logits = logits_at(module, keep, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return logits, targets[keep[:, :-1]], keep.nonzero()[:, 0]


def logits_at(module: torch.nn.Module, keep: torch.Tensor, **inputs) -> torch.Tensor:
    """Logits [N, V] of ``module(**inputs)`` at the N positions where ``keep`` [B, T] is true, in row-major order.

    The model's own LM head is given an empty ``logits_to_keep`` (no head FLOPs) and the head runs on
    the kept positions' final hidden states only; a model without a Llama-like final norm computes
    full logits, gathered the same way (the same numbers). ``inputs`` may carry a KV cache."""
    parts = _head_parts(module)
    if parts is None:
        return module(**inputs).logits[keep]
    norm, head = parts
    capture = _FinalHidden(norm)
    try:
        none = torch.zeros(0, dtype=torch.long, device=keep.device)  # an empty index: logits [B, 0, V]
        module(**inputs, logits_to_keep=none)
    finally:
        capture.remove()
    hidden = capture.value
    if hidden is None or hidden.shape[:2] != keep.shape:
        raise RuntimeError("could not capture the final hidden states for the response-only LM head")
    return head(hidden[keep])


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


class Engine:
    """Shared bits; subclasses implement wrap/step/save/load."""

    backend = "base"

    def __init__(self, cfg: Any, model: torch.nn.Module, plan: BatchPlan, device: torch.device, rank: int, world_size: int):
        self.cfg, self.model, self.plan, self.device = cfg, model, plan, device
        self.rank, self.world_size = rank, world_size
        self.bf16 = use_bf16(cfg.precision, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                "the model has no trainable parameter: check training.lora_target_modules matches the model's layers"
            )
        # fused AdamW is a CUDA kernel; on CPU the default foreach implementation is used
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=device.type == "cuda"
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, plan, cfg.schedule))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def forward_loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            logits, targets, _ = response_logits(module, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return response_loss(logits, targets)

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Weights to export (collective under ZeRO-3); None means 'use the module as is'."""
        return None

    # ---- checkpoints (no pickle: safetensors + JSON) ----------------------------------------
    def _save_common(self, folder: Path, counters: dict | None = None, weights: bool = True, optimizer: bool = True) -> None:
        """Rank 0: the scheduler (+ counters) and, unless partitioned, trainable weights and optimizer."""
        if self.rank != 0:
            return
        if weights:
            save_file(_trainable_state(self.model), str(folder / TRAINABLE))
        state = {
            "backend": self.backend,
            "world_size": self.world_size,
            "scheduler": self.scheduler.state_dict(),
            **(counters or {}),
        }
        (folder / f"{ENGINE_STATE}.json").write_text(json.dumps(state, indent=2))
        if optimizer:
            save_state(folder, OPTIMIZER_STATE, self.optimizer.state_dict())

    def _engine_state(self, folder: Path) -> dict:
        """engine.json, after checking the folder is an edsft checkpoint of this backend."""
        state_file = folder / f"{ENGINE_STATE}.json"
        if not state_file.exists():
            legacy = [p.name for p in folder.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
            raise UserError(
                f"checkpoint {folder} has no {state_file.name}"
                + (
                    f" but pickle files {legacy[:3]} (an older edsft or DeepSpeed format, which runs code when loaded)"
                    if legacy
                    else ""
                )
                + ": it is not an edsft checkpoint this version loads; train again with --force (or another training.storage_path)"
            )
        state = json.loads(state_file.read_text())
        if state.get("backend") != self.backend:
            raise UserError(
                f"checkpoint {folder} was written by training.backend={state.get('backend')!r}, this run uses {self.backend!r}: "
                "resume with the same backend or train again with --force"
            )
        return state

    def _load_common(self, folder: Path, state: dict, weights: bool = True, optimizer: bool = True) -> None:
        """Load what _save_common wrote."""
        if weights:
            saved = load_file(str(folder / TRAINABLE))
            missing = [k for k, p in self.model.named_parameters() if p.requires_grad and k not in saved]
            if missing:
                raise UserError(
                    f"checkpoint {folder} lacks trainable weights {missing[:3]}...: it comes from another model or LoRA config"
                )
            self.model.load_state_dict(saved, strict=False)
        if optimizer:
            self.optimizer.load_state_dict(load_state(folder, OPTIMIZER_STATE, self.device))
        self.scheduler.load_state_dict(state["scheduler"])


class DDPEngine(Engine):
    backend = "ddp"

    def __init__(self, *args):
        super().__init__(*args)
        self.wrapped = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DDP(self.model, device_ids=ids)

    def micro_step(self, batch: dict, micro: int) -> tuple[float, int]:
        last = micro == self.plan.grad_accum - 1
        # gradients are all-reduced only on the last micro batch of a step
        ctx = self.wrapped.no_sync() if (self.world_size > 1 and not last) else contextlib.nullcontext()
        with ctx:
            loss, n = self.forward_loss(self.wrapped, batch)
            (loss / self.plan.grad_accum).backward()
        return float(loss.detach()), n

    def optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else torch.tensor(0.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder: Path) -> None:
        self._save_common(folder)  # DDP ranks hold identical copies: rank 0 writes them

    def load(self, folder: Path) -> None:
        self._load_common(folder, self._engine_state(folder))


@contextlib.contextmanager
def _without_shm_comm_op():
    """DeepSpeed's comm backend without its shared-memory CPU all-reduce op, for a single process.

    On CPU, DeepSpeed's torch comm backend (created once per process, inside ``initialize``) loads
    a C++ shared-memory all-reduce extension: it probes every op's compatibility (compiler
    subprocesses), then JIT-compiles the extension with ninja the first time on a machine and
    re-checks it on every start; a rebuild took 118 s of a 2-core node's trial start-up (0.1-0.4 s
    when cached). One process has nothing to all-reduce, so the backend is created without it and
    falls back to torch.distributed, which it uses whenever the op is missing.
    """
    module = sys.modules.get("deepspeed.comm.torch")  # the attribute deepspeed.comm.torch is torch itself
    original = getattr(module, "build_shm_op", None)
    if original is None:  # another DeepSpeed layout: leave it as it is
        yield
        return
    module.build_shm_op = lambda: None
    try:
        yield
    finally:
        module.build_shm_op = original


class DeepSpeedEngine(Engine):
    backend = "deepspeed"

    def __init__(self, *args):
        super().__init__(*args)
        import deepspeed

        ds_config = {
            "train_batch_size": self.plan.global_batch,
            "train_micro_batch_size_per_gpu": self.plan.micro_batch_size,
            "gradient_accumulation_steps": self.plan.grad_accum,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "steps_per_print": 10**9,  # our loop logs; silence DeepSpeed's own prints
            "wall_clock_breakdown": False,
        }
        single_cpu_process = self.world_size == 1 and self.device.type == "cpu"
        with _without_shm_comm_op() if single_cpu_process else contextlib.nullcontext():
            if not dist.is_initialized():  # Ray Train has set up the process group already
                deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
            self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model,
                optimizer=self.optimizer,  # a torch optimizer: DeepSpeed's fused CPU/GPU Adam is not needed
                lr_scheduler=self.scheduler,
                config=ds_config,
                dist_init_required=False,
            )

    def micro_step(self, batch: dict, micro: int) -> tuple[float, int]:
        loss, n = self.forward_loss(self.wrapped, batch)
        self.wrapped.backward(loss)  # DeepSpeed divides by grad_accum itself
        self.wrapped.step()  # a no-op except at the accumulation boundary
        return float(loss.detach()), n

    def optimizer_step(self) -> float:
        norm = self.wrapped.get_global_grad_norm()  # the step already happened in micro_step
        return float(norm) if norm is not None else 0.0

    def lr(self) -> float:
        return float(self.wrapped.get_lr()[0])

    def _zero_name(self) -> str:
        return f"zero_rank{self.rank}"

    @contextlib.contextmanager
    def _checkpoint_event(self):
        """What DeepSpeed's save/load_checkpoint wrap around the optimizer state: under ZeRO-3 all
        parameters partitioned first, the persistent ones gathered after (collective)."""
        opt = self.wrapped.optimizer
        if hasattr(opt, "checkpoint_event_prologue"):
            opt.checkpoint_event_prologue()
        yield
        if hasattr(opt, "checkpoint_event_epilogue"):
            opt.checkpoint_event_epilogue()

    def save(self, folder: Path) -> None:
        stage = self.cfg.zero_stage
        counters = {
            "zero_stage": stage,
            "global_steps": self.wrapped.global_steps,
            "global_samples": self.wrapped.global_samples,
            "skipped_steps": self.wrapped.skipped_steps,
        }
        # ZeRO-0 holds whole optimizer copies (rank 0 saves one); under ZeRO-3 the module's
        # parameters are partitions, so the weights come back from the fp32 partitions instead
        self._save_common(folder, counters, weights=stage < 3, optimizer=stage == 0)
        if stage > 0:
            # each rank's own partition of the optimizer state and of the fp32 master weights, from
            # DeepSpeed's own state dict. The loss scaler object is left out: edsft never enables
            # DeepSpeed's fp16 loss scaling (precision is autocast), so it is the constant 1.
            with self._checkpoint_event():
                sd = dict(self.wrapped.optimizer.state_dict())
            # param_slice_mappings (dataclasses) only serve DeepSpeed's offline universal-checkpoint
            # converter; loading into the same layout never reads them
            sd.pop("param_slice_mappings", None)
            scaler = sd.pop("loss_scaler", None)
            if scaler is not None and (getattr(scaler, "dynamic", False) or float(getattr(scaler, "cur_scale", 1.0)) != 1.0):
                raise RuntimeError("DeepSpeed's loss scaling is on, which edsft's checkpoints do not store: leave fp16 off")
            save_state(folder, self._zero_name(), sd)

    def load(self, folder: Path) -> None:
        stage = self.cfg.zero_stage
        state = self._engine_state(folder)
        if state.get("zero_stage") != stage or (stage > 0 and state.get("world_size") != self.world_size):
            raise UserError(
                f"checkpoint {folder} was written with training.zero_stage={state.get('zero_stage')} on {state.get('world_size')} workers, "
                f"this run has {stage} on {self.world_size}: ZeRO partitions load only into the same layout; "
                "resume with the same settings or train again with --force"
            )
        self._load_common(folder, state, weights=stage < 3, optimizer=stage == 0)
        if stage > 0:
            opt = self.wrapped.optimizer
            sd = load_state(folder, self._zero_name(), self.device)
            sd["loss_scaler"] = opt.loss_scaler  # the constant scaler it was saved with (see save)
            with self._checkpoint_event():
                # DeepSpeed picks this rank's entry of the list; load_from_fp32_weights: no precision loss
                opt.load_state_dict([sd] * self.world_size, load_optimizer_states=True, load_from_fp32_weights=True)
        self.wrapped.global_steps = state["global_steps"]
        self.wrapped.global_samples = state["global_samples"]
        self.wrapped.skipped_steps = state["skipped_steps"]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.zero_stage < 3:
            return None
        # ZeRO-3 partitions the weights: gather them (all ranks must call this)
        return self.wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.cfg.lora)


def build_engine(cfg: Any, model: torch.nn.Module, plan: BatchPlan, device: torch.device, rank: int, world_size: int) -> Engine:
    if cfg.backend == "deepspeed":
        return DeepSpeedEngine(cfg, model, plan, device, rank, world_size)
    if cfg.backend == "ddp":
        return DDPEngine(cfg, model, plan, device, rank, world_size)
    raise ValueError(f"training.backend={cfg.backend!r} is not one of ['deepspeed', 'ddp']: pick one")
