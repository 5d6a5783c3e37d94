"""Learning-rate schedules, stepped once per OPTIMIZER step (never per micro-batch).

Each is a LambdaLR: the lr used by optimizer step i (0-based) is `lr * factor(i)`. Each component
has its own optimizer and its own scheduler: the same shape unless `schedule.text_encoder` gives the
text encoder its own (EveryDream2's text_encoder_overrides do).

decay_steps defaults to the whole run; `decay_run_multiple` m makes it int(total_steps * m), and
`warmup_decay_divisor` d makes the warmup decay // d (EveryDream2's defaults: m 1.5, d 50).

- constant, constant_with_warmup, linear, cosine, cosine_with_restarts: diffusers' get_scheduler,
  with its conventions (warmup rises from 0, so step 0 of a warmup has lr 0; linear and cosine
  decay to 0 at `decay_steps`, default the whole run).
- polynomial: diffusers' polynomial decay, but with lr_end = end_ratio * lr. (get_scheduler fixes
  lr_end at 1e-7 and refuses any lr at or below it: every text-encoder lr in seed 004.)
- linear_ramp: 0 -> lr over the run (the LR range test, seed 003): factor(i) = (i + 1) / N, so the
  first step already learns a little and the last one uses exactly lr.
- triangular, triangular2 (Smith, "Cyclical Learning Rates"): with s = half_cycle_steps,
  cycle = floor(1 + i / 2s), x = |i / s - 2 cycle + 1|, and base = min_lr_ratio * lr:
  lr_i = base + (lr - base) * max(0, 1 - x); triangular2 halves the amplitude every cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from workbench.train.recipe import ScheduleFields


def linear_ramp_factor(total_steps: int) -> Callable[[int], float]:
    n = max(1, total_steps)
    return lambda i: min(1.0, (i + 1) / n)


def triangular_factor(half_cycle_steps: int, min_lr_ratio: float, halving: bool) -> Callable[[int], float]:
    s = half_cycle_steps

    def factor(i: int) -> float:
        cycle = math.floor(1 + i / (2 * s))
        x = abs(i / s - 2 * cycle + 1)
        amplitude = (1.0 - min_lr_ratio) * max(0.0, 1.0 - x)
        if halving:
            amplitude /= 2 ** (cycle - 1)
        return min_lr_ratio + amplitude

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleFields, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler for one optimizer; `total_steps` is the run's number of optimizer steps.
    `schedule` is one component's (`recipe.schedule.for_component(c)`)."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler
    from torch.optim.lr_scheduler import LambdaLR

    name = schedule.name
    decay = schedule.decay_for(total_steps)
    warmup = schedule.warmup_for(total_steps)
    if name == "linear_ramp":
        return LambdaLR(optimizer, linear_ramp_factor(decay))
    if name in ("triangular", "triangular2"):
        assert schedule.half_cycle_steps is not None  # the recipe schema requires it
        factor = triangular_factor(schedule.half_cycle_steps, schedule.min_lr_ratio, name == "triangular2")
        return LambdaLR(optimizer, factor)
    if name == "polynomial":
        lr = optimizer.defaults["lr"]
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, decay, lr_end=schedule.end_ratio * lr, power=schedule.power
        )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=decay,
        num_cycles=schedule.num_cycles,
    )


def current_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The lr the NEXT optimizer step will use."""
    return float(scheduler.get_last_lr()[0])
