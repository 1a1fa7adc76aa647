"""The two training backends behind one small interface: DeepSpeed (ZeRO 0-3) and torch DDP.

An :class:`Engine` owns the (wrapped) model, the optimizer and the lr scheduler and knows how to
run one micro batch forward+backward, take an optimizer step, save/load a resumable checkpoint
and export the final weights. The training loop (loop.py) is then the same for both backends.

Precision: on GPU (``precision: auto``) the frozen base weights are bf16, LoRA adapters (or the
full model when ``lora: false``) stay fp32, and forward runs under ``torch.autocast(bf16)`` -
the same for both backends, so DeepSpeed's own fp16/bf16 modes are not used. On CPU: fp32.
Checkpoints: DeepSpeed's ``save_checkpoint`` (every rank writes its own ZeRO shard; frozen base
weights are excluded under LoRA); DDP writes the trainable weights as safetensors plus the
optimizer/scheduler state (rank 0 only: DDP ranks hold identical copies).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edsft.training.data import IGNORE_INDEX
from edsft.training.schedule import BatchPlan, lr_factor

__all__ = ["Engine", "build_engine", "response_loss", "use_bf16"]

_DS_TAG = "state"  # one tag per checkpoint folder: each folder is one step


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda"  # auto


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over response tokens (labels != IGNORE_INDEX) and their count."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum / max(n, 1), n


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
            out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return response_loss(out.logits, batch["labels"])

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
