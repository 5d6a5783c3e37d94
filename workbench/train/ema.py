"""An exponential moving average (EMA) of the trained weights.

After every `every` optimizer steps, each trained parameter's shadow moves toward it:

    shadow <- shadow + (1 - d_t) * (param - shadow),    d_t = min(decay, (1 + t) / (10 + t))

t counts the updates made so far (0 for the first). The (1 + t) / (10 + t) warm-up, as in
diffusers' EMAModel, keeps the first updates from pinning the average to the starting weights for
thousands of steps; `ema_warmup: false` leaves it out (EveryDream2 has none). Shadows are fp32,
on the training device or on the CPU (`ema_device: cpu`
saves VRAM at the cost of a copy per update). Only trained parameters have shadows: frozen ones are
their own average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class EMA:
    decay: float
    every: int
    params: dict[str, list[torch.nn.Parameter]]  # component -> its trained parameters
    shadows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    updates: int = 0
    warmup: bool = True  # False: the full decay from the first update (EveryDream2)


def ema_start(
    params: dict[str, list[torch.nn.Parameter]],
    decay: float,
    every: int = 1,
    device: str | None = None,
    warmup: bool = True,
) -> EMA:
    """Shadows equal to the current weights; `device` None keeps each beside its parameter."""
    shadows = {
        c: [p.detach().to(device or p.device, torch.float32, copy=True) for p in ps]
        for c, ps in params.items()
    }
    return EMA(decay=decay, every=every, params=params, shadows=shadows, warmup=warmup)


def ema_decay_at(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: EMA, step: int) -> bool:
    """Move the shadows after optimizer step `step` (1-based) when it is one of every `every`."""
    if step % ema.every:
        return False
    weight = 1.0 - (ema_decay_at(ema.decay, ema.updates) if ema.warmup else ema.decay)
    for c, params in ema.params.items():
        for shadow, p in zip(ema.shadows[c], params, strict=True):
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), weight)
    ema.updates += 1
    return True


@contextmanager
@torch.no_grad()
def ema_weights(ema: EMA) -> Iterator[None]:
    """Inside the block the trained parameters hold the EMA weights (to save or evaluate them);
    the training weights are put back, bit for bit, when it ends."""
    saved = {c: [p.detach().clone() for p in ps] for c, ps in ema.params.items()}
    try:
        for c, params in ema.params.items():
            for shadow, p in zip(ema.shadows[c], params, strict=True):
                p.copy_(shadow)
        yield
    finally:
        for c, params in ema.params.items():
            for original, p in zip(saved[c], params, strict=True):
                p.copy_(original)


def ema_state(ema: EMA, names: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The shadows as "ema.COMPONENT.PARAM_NAME" tensors (for the resumable state)."""
    return {f"ema.{c}.{n}": s for c in ema.shadows for n, s in zip(names[c], ema.shadows[c], strict=True)}


def ema_load(ema: EMA, names: dict[str, list[str]], tensors: dict[str, torch.Tensor], updates: int) -> None:
    for c in ema.shadows:
        for n, shadow in zip(names[c], ema.shadows[c], strict=True):
            shadow.copy_(tensors[f"ema.{c}.{n}"])
    ema.updates = updates
