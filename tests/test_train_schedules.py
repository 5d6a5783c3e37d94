"""Learning-rate schedules against values computed by hand (lr of optimizer step i = lr * factor(i))."""

import math

import pytest
import torch

from workbench.train.recipe import ScheduleSection
from workbench.train.schedules import build_scheduler, linear_ramp_factor, triangular_factor


def lrs(schedule: dict, total: int, lr: float = 1.0, steps: int | None = None) -> list[float]:
    """The lr each optimizer step uses, stepping the scheduler once per optimizer step."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = build_scheduler(opt, ScheduleSection(**schedule), total)
    out = []
    for _ in range(steps or total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_and_warmup():
    assert lrs({"name": "constant"}, 4, lr=0.5) == [0.5] * 4
    # diffusers: warmup rises from 0 over warmup_steps, then constant
    assert lrs({"name": "constant_with_warmup", "warmup_steps": 4}, 6) == [0, 0.25, 0.5, 0.75, 1, 1]


def test_linear_decays_to_zero_after_warmup():
    # warmup 2 then linear decay over the remaining 4 of 6 steps: (6 - i) / (6 - 2)
    assert lrs({"name": "linear", "warmup_steps": 2}, 6) == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25])


def test_cosine_and_restarts():
    got = lrs({"name": "cosine"}, 4)
    assert got == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    # two hard restarts over 8 steps: each cycle is a half cosine over 4 steps
    got = lrs({"name": "cosine_with_restarts", "num_cycles": 2}, 8)
    cycle = [0.5 * (1 + math.cos(math.pi * ((2 * i / 8) % 1))) for i in range(4)]
    assert got == pytest.approx(cycle + cycle)


def test_polynomial_end_ratio_is_relative_to_each_lr():
    # 5e-8 (seed 004's UNet lr) is below diffusers' fixed lr_end of 1e-7: wb uses a ratio
    got = lrs({"name": "polynomial", "power": 2.0, "end_ratio": 0.1}, 4, lr=5e-8)
    expected = [(5e-8 - 5e-9) * (1 - i / 4) ** 2 + 5e-9 for i in range(4)]
    assert got == pytest.approx(expected, rel=1e-9)


def test_linear_ramp_reaches_lr_on_the_last_step():
    assert lrs({"name": "linear_ramp"}, 4, lr=3e-6) == pytest.approx([0.75e-6, 1.5e-6, 2.25e-6, 3e-6])
    assert linear_ramp_factor(400)(0) == 1 / 400
    # decay_steps shortens the ramp; after it the lr stays at lr
    assert lrs({"name": "linear_ramp", "decay_steps": 2}, 4) == [0.5, 1, 1, 1]


def test_triangular_matches_smiths_formula_by_hand():
    # s = 2, base = 0.2: it 0..8 -> x = 1, .5, 0, .5, 1, .5, 0, .5, 1
    f = triangular_factor(2, 0.2, halving=False)
    assert [f(i) for i in range(9)] == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.6, 1.0, 0.6, 0.2])
    # triangular2 halves the amplitude (1 - 0.2 = 0.8) each cycle: second peak 0.2 + 0.4
    f2 = triangular_factor(2, 0.2, halving=True)
    assert [f2(i) for i in range(9)] == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.4, 0.6, 0.4, 0.2])
    got = lrs({"name": "triangular2", "half_cycle_steps": 2, "min_lr_ratio": 0.2}, 9, lr=1e-6)
    assert got == pytest.approx([v * 1e-6 for v in (0.2, 0.6, 1.0, 0.6, 0.2, 0.4, 0.6, 0.4, 0.2)])
