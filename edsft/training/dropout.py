"""Dropout for LoRA inputs on CPU, from 16-bit random numbers.

``torch.nn.Dropout`` draws its mask with ``bernoulli_``, one Mersenne-Twister number and a float
conversion per element: on CPU that cost 4.5 ns per element, 50x a multiply, and with peft's
dropout on the input of each of SmolLM2's 210 LoRA modules it was the second-largest cost of a
bf16 LoRA step after the matmuls themselves (19% of the profile). :class:`Dropout16` draws 64
random bits per 4 elements (``torch.randint`` on int64, viewed as int16) and keeps an element when
its 16-bit number is at or above ``p`` x 65536: the same Bernoulli mask with ``p`` rounded to a
multiple of 1/65536 (0.05 -> 0.050003), kept elements scaled by 1 / (1 - that p), 5x cheaper to draw.
It uses torch's default generator, so seeds and the RNG state saved in checkpoints cover it.
"""

from __future__ import annotations

import torch

__all__ = ["Dropout16", "use_dropout16"]

_LEVELS = 1 << 16


class Dropout16(torch.nn.Module):
    """Inverted dropout with probability ``round(p * 65536) / 65536``; identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p!r} must be in [0, 1)")
        self.cut = round(p * _LEVELS)  # elements whose number is below cut are dropped
        self.p = self.cut / _LEVELS
        self.scale = 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        r = words.view(torch.int16)[:n].view(x.shape)
        return torch.where(r >= self.cut - _LEVELS // 2, x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_dropout16(model: torch.nn.Module) -> int:
    """Replace every peft LoRA dropout (``lora_dropout[adapter]``, an ``nn.Dropout``) by :class:`Dropout16`.

    Returns how many were replaced. Dropout has no weights: saved adapters are unchanged.
    """
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, d in list(drops.items()):
            if isinstance(d, torch.nn.Dropout) and d.p > 0:
                drops[name] = Dropout16(d.p).train(d.training)
                replaced += 1
    return replaced
