"""The two training backends behind one small interface: DeepSpeed (ZeRO 0-3) and torch DDP.

An :class:`Engine` owns the (wrapped) model, the optimizer and the lr scheduler and knows how to
run one micro batch forward+backward, take an optimizer step, save/load a resumable checkpoint
and export the final weights. The training loop (loop.py) is then the same for both backends.

Precision: ``precision: auto`` is bf16 on GPU and on CPUs with native bf16 matmuls
(edsft.models.cpu_supports_bf16: AVX512-BF16 / AMX / Arm BF16), fp32 elsewhere. In bf16 the frozen
base weights are bf16, LoRA adapters (or the full model when ``lora: false``) and the optimizer state
stay fp32, and forward runs under ``torch.autocast(bf16)`` - the same for both backends, so
DeepSpeed's own fp16/bf16 modes are not used. The loss is computed in fp32.

Logits only where the loss needs them: the model's own LM head runs on the last position only
(``logits_to_keep=1``); the final hidden states are captured at the decoder's norm and the head is
applied to the response positions alone (:func:`response_logits`). With SmolLM2's 49k-token head
over every prompt token that was a large share of each step's FLOPs and memory traffic.
Checkpoints: DeepSpeed's ``save_checkpoint`` (every rank writes its own ZeRO shard; frozen base
weights are excluded under LoRA); DDP writes the trainable weights as safetensors plus the
optimizer/scheduler state (rank 0 only: DDP ranks hold identical copies).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edsft.models import cpu_supports_bf16
from edsft.training.data import IGNORE_INDEX
from edsft.training.schedule import BatchPlan, lr_factor

__all__ = ["Engine", "build_engine", "response_loss", "response_logits", "use_bf16"]

_DS_TAG = "state"  # one tag per checkpoint folder: each folder is one step


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

    ``module`` is called (so DeepSpeed / DDP hooks run) with ``logits_to_keep=1``; the LM head is
    then applied to the gathered response positions only. Models without a Llama-like final norm
    fall back to full logits, gathered the same way: the numbers are identical either way.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # [B, T-1]: position t predicts labels[t + 1]
    rows = keep.nonzero()[:, 0]
    parts = _head_parts(module)
    if parts is None:
        logits = module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][keep], targets[keep], rows
    norm, head = parts
    capture = _FinalHidden(norm)
    try:
        module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        capture.remove()
    hidden = capture.value
    if hidden is None or hidden.shape[:2] != input_ids.shape:
        raise RuntimeError("could not capture the final hidden states for the response-only LM head")
    return head(hidden[:, :-1][keep]), targets[keep], rows


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
            raise ValueError("the model has no trainable parameter: check training.lora_target_modules matches the model's layers")
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
        if self.rank != 0:
            return
        save_file(_trainable_state(self.model), str(folder / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        weights = load_file(str(folder / "trainable.safetensors"))
        missing = [k for k, p in self.model.named_parameters() if p.requires_grad and k not in weights]
        if missing:
            raise ValueError(f"checkpoint {folder} lacks trainable weights {missing[:3]}...: it comes from another model or LoRA config")
        self.model.load_state_dict(weights, strict=False)
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine(Engine):
    backend = "deepspeed"

    def __init__(self, *args):
        super().__init__(*args)
        import deepspeed

        if not dist.is_initialized():  # Ray Train has set up the process group already
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        ds_config = {
            "train_batch_size": self.plan.global_batch,
            "train_micro_batch_size_per_gpu": self.plan.micro_batch_size,
            "gradient_accumulation_steps": self.plan.grad_accum,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "steps_per_print": 10**9,  # our loop logs; silence DeepSpeed's own prints
            "wall_clock_breakdown": False,
        }
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

    def save(self, folder: Path) -> None:
        # collective: every rank writes its own ZeRO shard into its own folder
        self.wrapped.save_checkpoint(str(folder), tag=_DS_TAG, exclude_frozen_parameters=self.cfg.lora)

    def load(self, folder: Path) -> None:
        path, _ = self.wrapped.load_checkpoint(
            str(folder), tag=_DS_TAG, load_module_strict=not self.cfg.lora, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {folder}: it is not a DeepSpeed checkpoint of this run")

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
