"""The statistics of `wb judge`: a Bradley-Terry model of pairwise votes, its bootstrap intervals,
which pair to show next, and the rank correlation with the automatic scores.

Bradley-Terry: item i has a strength theta_i (a log-odds scale) and wins against j with probability
sigmoid(theta_i - theta_j). A "same" vote counts half a win for each side. The fit is the maximum
of the log-likelihood plus a Gaussian prior theta ~ N(0, PRIOR_SD^2) on every item: without it an
item that won every vote would have an infinite strength. Newton's method, vectorised so that all
bootstrap replicates are fitted at once. At the optimum the strengths sum to zero (the prior is
centred and the likelihood only sees differences), so they read as "above or below average".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIOR_SD = 2.0  # a win probability of 0.98 between two items is two prior standard deviations apart
LEVEL = 0.90  # the bootstrap interval's nominal coverage
BOOTSTRAP = 2000


@dataclass
class Fit:
    names: list[str]
    strength: np.ndarray  # (n,) MAP log-strengths, summing to 0
    low: np.ndarray  # (n,) bootstrap interval, percentile method
    high: np.ndarray
    p_best: np.ndarray  # (n,) share of bootstrap replicates in which the item is the strongest
    wins: np.ndarray  # (n, n) wins[i, j]: votes for i against j, a "same" counted 0.5 each way
    votes: int
    level: float


def win_matrix(n: int, votes: list[tuple[int, int, float]]) -> np.ndarray:
    """votes: (i, j, score of i) with score 1 (i better), 0 (j better) or 0.5 (same)."""
    w = np.zeros((n, n))
    for i, j, s in votes:
        w[i, j] += s
        w[j, i] += 1.0 - s
    return w


def fit_strengths(
    wins: np.ndarray, prior_sd: float = PRIOR_SD, prior_mean: np.ndarray | None = None, iterations: int = 50
) -> np.ndarray:
    """MAP Bradley-Terry strengths for one win matrix (n, n) or a stack of them (b, n, n).

    Maximises sum_ij wins[i,j] log sigmoid(t_i - t_j) - sum_i t_i^2 / (2 prior_sd^2) by Newton's
    method; the objective is strictly concave, so the steps converge from zero in a few iterations.
    `prior_mean` (same leading shape as the strengths) moves the prior's centre; the result is then
    re-centred to sum to zero.
    """
    w = np.asarray(wins, dtype=float)
    single = w.ndim == 2
    if single:
        w = w[None]
    b, n, _ = w.shape
    total = w + np.swapaxes(w, 1, 2)  # comparisons between i and j
    theta = np.zeros((b, n))
    mean = np.zeros((b, n)) if prior_mean is None else np.asarray(prior_mean, dtype=float).reshape(b, n)
    precision = 1.0 / prior_sd**2
    eye = np.eye(n)
    for _ in range(iterations):
        diff = theta[:, :, None] - theta[:, None, :]
        p = 1.0 / (1.0 + np.exp(-diff))  # p[i, j] = P(i beats j)
        grad = (w - total * p).sum(axis=2) - precision * (theta - mean)
        curv = total * p * (1.0 - p)
        hess = curv - eye * curv.sum(axis=2)[:, :, None] - precision * eye
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        theta = theta - step
        if np.abs(step).max() < 1e-10:
            break
    theta = theta - theta.mean(axis=1, keepdims=True)
    return theta[0] if single else theta


def bootstrap(
    n: int, votes: list[tuple[int, int, float]], reps: int = BOOTSTRAP, seed: int = 0,
    prior_sd: float = PRIOR_SD,
) -> np.ndarray:  # fmt: skip
    """Strengths refitted on `reps` resamples of the votes (drawn with replacement): (reps, n).

    With few votes this is overconfident (one vote resampled is always that vote): the ranking
    says nothing about who is best until every pair was compared (see session.ranking)."""
    if not votes:
        return np.zeros((reps, n))
    rng = np.random.default_rng(seed)
    # A resample only needs how often each vote was drawn: counts of uniform draws, row by row.
    v = len(votes)
    drawn = rng.integers(v, size=(reps, v)) + v * np.arange(reps)[:, None]
    counts = np.bincount(drawn.ravel(), minlength=reps * v).reshape(reps, v).astype(float)
    each = np.zeros((len(votes), n * n))  # vote k's contribution to the flattened win matrix
    for k, (i, j, s) in enumerate(votes):
        each[k, i * n + j] += s
        each[k, j * n + i] += 1.0 - s
    w = (counts @ each).reshape(reps, n, n)
    return fit_strengths(w, prior_sd)


def fit(
    names: list[str], votes: list[tuple[int, int, float]], reps: int = BOOTSTRAP, level: float = LEVEL,
    seed: int = 0, prior_sd: float = PRIOR_SD,
) -> Fit:  # fmt: skip
    """Strengths, percentile-bootstrap intervals at `level`, and the probability of being best."""
    n = len(names)
    wins = win_matrix(n, votes)
    strength = fit_strengths(wins, prior_sd)
    boot = bootstrap(n, votes, reps, seed, prior_sd)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    best = np.argmax(boot, axis=1)
    # Replicates with no votes at all (all strengths 0) share "best" evenly instead of naming item 0.
    flat = np.ptp(boot, axis=1) == 0
    p_best = np.bincount(best[~flat], minlength=n).astype(float) + flat.sum() / n
    return Fit(list(names), strength, low, high, p_best / reps, wins, len(votes), level)


def win_probability(strength: np.ndarray) -> np.ndarray:
    """p[i, j] = P(i beats j) under the model."""
    return 1.0 / (1.0 + np.exp(-(strength[:, None] - strength[None, :])))


def posterior_cov(strength: np.ndarray, wins: np.ndarray, prior_sd: float = PRIOR_SD) -> np.ndarray:
    """The Laplace approximation's covariance of the strengths: minus the inverse Hessian at the fit."""
    n = len(strength)
    total = wins + wins.T
    p = win_probability(strength)
    curv = total * p * (1.0 - p)
    hess = curv - np.diag(curv.sum(axis=1)) - np.eye(n) / prior_sd**2
    return -np.linalg.inv(hess)


def next_pair(
    strength: np.ndarray, wins: np.ndarray, rng: np.random.Generator, prior_sd: float = PRIOR_SD
) -> tuple[int, int]:
    """The pair to show next: a pair never compared first (so every pair is covered), then the pair
    whose vote tells the most: the one maximising p (1 - p) var(t_i - t_j), the expected information
    of one vote about the strengths (p: the model's probability that i wins; the variance from the
    Laplace approximation). A sure outcome (p near 0 or 1) or a well-measured difference scores low.
    Ties are broken at random."""
    n = len(strength)
    iu, ju = np.triu_indices(n, k=1)
    seen = (wins + wins.T)[iu, ju]
    if (seen == 0).any():
        candidates = np.flatnonzero(seen == 0)
    else:
        p = win_probability(strength)[iu, ju]
        cov = posterior_cov(strength, wins, prior_sd)
        var = cov[iu, iu] + cov[ju, ju] - 2 * cov[iu, ju]
        score = p * (1.0 - p) * var
        candidates = np.flatnonzero(score >= score.max() * (1 - 1e-9))
    k = rng.choice(candidates)
    return int(iu[k]), int(ju[k])


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged); None when undefined."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 2:
        return None
    ra, rb = ranks(a[keep]), ranks(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return None if denom == 0 else float((ra * rb).sum() / denom)
