"""lr-find's reading of synthetic range tests of every shape, over 100 noise seeds at 1%, 2% and 5%
noise (of the loss; the fall is 30% of it, 41 evaluations as `wb lr-find` makes by default): how
often it is right, and above all that it does not claim a bound the data does not show."""

from collections import Counter

import numpy as np
import pytest

from workbench.train.lr_find import analyze

N = 41
SEEDS = range(100)
NOISES = (0.01, 0.02, 0.05)


def curve(shape: str, x: np.ndarray) -> np.ndarray:
    """The noiseless loss against x in 0..1 (where along the ramp)."""
    if shape == "seed003":  # flat, falls, flattens, turns up (seed 003's first run)
        y = np.where(x < 0.15, 1.0, np.where(x < 0.55, 1.0 - 0.3 * (x - 0.15) / 0.4, 0.7))
        return y + np.where(x > 0.75, 0.3 * ((x - 0.75) / 0.25) ** 2, 0.0)
    if shape == "falls_only":  # still falling at lr-max: the upper bound is beyond the range
        return np.where(x < 0.2, 1.0, 1.0 - 0.3 * (x - 0.2) / 0.8)
    if shape == "flattens":  # falls, then a floor to the end
        return np.where(x < 0.1, 1.0, np.where(x < 0.5, 1.0 - 0.3 * (x - 0.1) / 0.4, 0.7))
    if shape == "flat":
        return np.ones_like(x)
    if shape == "falls_from_start":  # a log ramp whose first lr already learns
        return np.where(x < 0.5, 1.0 - 0.3 * x / 0.5, 0.7)
    raise KeyError(shape)


def reading(shape: str, noise: float, seed: int) -> str:
    x = np.linspace(0, 1, N)
    y = curve(shape, x) * (1 + noise * np.random.default_rng(seed).standard_normal(N))
    if shape == "falls_from_start":
        f = analyze(1e-5 * 10 ** (3 * x), y, log=True)  # 1e-5 .. 1e-2
    else:
        f = analyze(1e-3 * x, y, log=False)  # a linear ramp from 0 to 1e-3
    if f.lower is None and f.upper is None:
        return "none"
    if f.midpoint is not None:
        assert f.lower < f.midpoint < f.upper
        return "both"
    assert "no midpoint" in f.message and "rerun with --lr-" in f.message
    return "no lower" if f.lower is None else "no upper"


# shape: (the right reading, wrong readings allowed per 100 at each noise level, the reading that
# would claim a bound not in the data and how often that may happen)
EXPECTED = {
    "seed003": ("both", {0.01: 0, 0.02: 0, 0.05: 10}, None, 0),
    "falls_only": ("no upper", {0.01: 0, 0.02: 0, 0.05: 12}, "both", 0),
    "flattens": ("both", {0.01: 1, 0.02: 2, 0.05: 20}, None, 0),
    "flat": ("none", {0.01: 0, 0.02: 0, 0.05: 0}, "both", 0),
    "falls_from_start": ("no lower", {0.01: 1, 0.02: 3, 0.05: 25}, "both", 2),
}


@pytest.mark.parametrize("shape", list(EXPECTED))
def test_misclassification_rate(shape):
    right, allowed, claim, claim_allowed = EXPECTED[shape]
    for noise in NOISES:
        counts = Counter(reading(shape, noise, seed) for seed in SEEDS)
        wrong = sum(v for k, v in counts.items() if k != right)
        assert wrong <= allowed[noise], (noise, dict(counts))
        if claim is not None:
            assert counts[claim] <= claim_allowed, (noise, dict(counts))


def test_the_smoothed_curve_follows_the_points():
    """The plotted curve stays in the cloud of points: on smooth curves (seed 003's with rounded
    corners, and the toy's decelerating fall) at 1-5% noise, 95% of the smoothed points lie within
    3 noise sigmas of the true loss and the mean distance is about one sigma or less."""
    x = np.linspace(0, 1, N)

    def softplus(v, w):
        return w * np.log1p(np.exp(v / w))

    curves = {
        "seed003": 1.0
        - 0.3 * (softplus(x - 0.15, 0.03) - softplus(x - 0.55, 0.03)) / 0.4
        + 0.3 * softplus(x - 0.75, 0.03) ** 2 / 0.0625,
        "toy": 0.07 + np.exp(-x / 0.2),
    }
    for truth in curves.values():
        for noise in NOISES:
            for seed in range(20):
                y = truth * (1 + noise * np.random.default_rng(seed).standard_normal(N))
                f = analyze(1e-3 * x, y, log=False)
                distance = np.abs(np.array(f.smoothed, dtype=float) - truth) / (noise * truth)
                assert np.percentile(distance, 95) < 3.0 and distance.mean() < 1.2, (noise, seed)
