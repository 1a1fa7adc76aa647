"""Batch sizes, step counts, the learning-rate schedule and which examples each step sees.

One source of truth: ``global batch = micro_batch_size x grad_accum x world_size``. Every
other number (steps per epoch, total steps, warmup steps) comes from :func:`batch_plan`, and
:func:`micro_batch_indices` maps (step, micro step, rank) to example indices, so a run that
resumes at step N sees exactly the batches it would have seen without the interruption, with no
sampler state to save.

Length grouping: given the items' token lengths, each epoch's shuffled order is regrouped so that
every micro batch holds items of similar length (HF's ``group_by_length`` recipe: sort the shuffled
order by length inside mega-batches of 50 micro batches, cut it into micro batches, shuffle those).
Micro batches are right-padded to their longest item only, so this removes most padding compute
while which items meet, and the order of the micro batches, stay random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

__all__ = ["BatchPlan", "batch_plan", "micro_batch_indices", "lr_factor"]


@dataclass(frozen=True)
class BatchPlan:
    n_items: int  # examples (or packed blocks) in one epoch
    micro_batch_size: int  # per rank, per forward/backward
    grad_accum: int  # micro batches per optimizer step
    world_size: int  # data-parallel ranks
    global_batch: int  # items per optimizer step, over all ranks
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epochs: float  # epochs actually covered by total_steps

    def as_dict(self) -> dict:
        return asdict(self)


def batch_plan(
    n_items: int,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    epochs: float = 1.0,
    max_steps: int | None = None,
    warmup_ratio: float = 0.0,
) -> BatchPlan:
    """Steps for ``epochs`` passes over ``n_items`` (or exactly ``max_steps`` when set)."""
    for name, value in (
        ("n_items", n_items),
        ("micro_batch_size", micro_batch_size),
        ("grad_accum", grad_accum),
        ("world_size", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            hint = (
                "the training data has no usable example: check annotated.parquet and training.max_seq_len"
                if name == "n_items"
                else "use an integer >= 1"
            )
            raise ValueError(f"{name}={value!r} must be an integer >= 1: {hint}")
    global_batch = micro_batch_size * grad_accum * world_size
    steps_per_epoch = math.ceil(n_items / global_batch)  # a short last step wraps into the next epoch
    if max_steps is not None:
        total = int(max_steps)
    else:
        total = max(1, math.ceil(epochs * n_items / global_batch))
    warmup = min(total, int(round(warmup_ratio * total)))
    return BatchPlan(
        n_items=n_items,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        epochs=total * global_batch / n_items,
    )


_MEGA_BATCH = 50  # micro batches per length-sorted group (HF Trainer's mega_batch_mult)


@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int, lengths: tuple[int, ...] | None = None, micro: int = 1) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None or micro <= 1:
        return tuple(order)
    out: list[int] = []
    for start in range(0, n, micro * _MEGA_BATCH):
        mega = sorted(order[start : start + micro * _MEGA_BATCH], key=lambda i: lengths[i])  # stable: ties stay random
        runs = [mega[i : i + micro] for i in range(0, len(mega), micro)]
        for k in torch.randperm(len(runs), generator=g).tolist():
            out += runs[k]
    return tuple(out)


def micro_batch_indices(
    plan: BatchPlan, step: int, micro_step: int, rank: int, seed: int, lengths: Sequence[int] | None = None
) -> list[int]:
    """Item indices of one rank's micro batch: an endless stream of seeded per-epoch permutations.

    Step ``s`` consumes stream positions ``[s * G, (s + 1) * G)`` (G = global batch); inside a
    step, micro step k of rank r takes slice ``(k * world_size + r) * micro`` of that window.
    With ``lengths`` (one per item) each epoch is length-grouped (see the module doc).
    """
    if lengths is not None and len(lengths) != plan.n_items:
        raise ValueError(f"lengths has {len(lengths)} entries for a plan over {plan.n_items} items: pass one length per item")
    key = tuple(int(x) for x in lengths) if lengths is not None else None
    start = step * plan.global_batch + (micro_step * plan.world_size + rank) * plan.micro_batch_size
    out = []
    orders: dict[int, tuple[int, ...]] = {}
    for pos in range(start, start + plan.micro_batch_size):
        epoch, offset = divmod(pos, plan.n_items)
        if epoch not in orders:
            orders[epoch] = _epoch_order(plan.n_items, seed, epoch, key, plan.micro_batch_size)
        out.append(orders[epoch][offset])
    return out


def lr_factor(step: int, plan: BatchPlan, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay to 0."""
    if step < plan.warmup_steps:
        return (step + 1) / (plan.warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, plan.total_steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule={schedule!r} is not one of ['cosine', 'linear', 'constant']: set training.schedule")
