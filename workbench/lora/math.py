"""LoRA math: the weight change of a module, and the SVD operations on it (extract, resize, merge).

All of it in float32 (shared/docs/LORA.md 2b, pitfall 4: compute in fp32, cast once when writing).
Formulas (LORA.md 1.1, 1.6, 2c-2e), with m the user's strength and s = alpha / r:

    LoRA (kohya, PEFT, LoCon): dW = s * up.flatten(1) @ down.flatten(1), reshaped to the weight
                               (Linear, 1x1 conv, kxk conv alike; Tucker `mid` folded in first)
    LoHa:  dW = s * (w1a @ w1b) * (w2a @ w2b)          (elementwise product; Tucker t1/t2 supported)
    LoKr:  dW = s * kron(w1, w2), w1 = w1a @ w1b or full, w2 = w2a @ w2b or full;
           s = alpha / r only when a factor is decomposed, else 1
    bake:  W' = W + m * dW
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.errors import WorkbenchError

F32 = torch.float32


def scale_of(alpha: float | None, rank: int) -> float:
    """alpha / rank; a missing (or zero) alpha means alpha = rank, i.e. scale 1 (kohya, A1111)."""
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def fit_shape(delta: Tensor, shape: Sequence[int], name: str = "module") -> Tensor:
    """`delta` reshaped to a weight's shape: equal element counts with the same output width only
    (a 1x1-conv LoRA on a Linear and back, LORA.md pitfall 6); anything else is refused."""
    shape = tuple(shape)
    if tuple(delta.shape) == shape:
        return delta
    if delta.numel() != _numel(shape) or delta.shape[0] != shape[0]:
        raise WorkbenchError(
            f"{name}: the LoRA makes a change of shape {list(delta.shape)}, the weight is {list(shape)}"
        )
    return delta.reshape(shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def lora_delta(
    up: Tensor,
    down: Tensor,
    alpha: float | None = None,
    shape: Sequence[int] | None = None,
    mid: Tensor | None = None,
) -> Tensor:
    """s * up @ down in float32, shaped like the weight (`shape`, default: the natural shape:
    [out, in] for 2-D down, [out, in, kh, kw] for a conv down). `mid` is LoCon's Tucker core
    [r, r, kh, kw] between a 1x1 down and a 1x1 up."""
    rank = down.shape[0]
    up32, down32 = up.to(F32).flatten(1), down.to(F32)
    if mid is not None:
        # dW[o, i, h, w] = sum_{a,b} up[o, a] mid[a, b, h, w] down[b, i]
        core = torch.einsum("abhw,bi->aihw", mid.to(F32), down32.flatten(1))
        natural = (up32.shape[0], core.shape[1], *core.shape[2:])
        delta = (up32 @ core.flatten(1)).reshape(natural)
    else:
        natural = (up32.shape[0], *down32.shape[1:])
        if len(natural) == 4 and natural[2:] == (1, 1) and shape is not None and len(shape) == 2:
            natural = natural[:2]
        delta = (up32 @ down32.flatten(1)).reshape(natural)
    s = scale_of(alpha, rank)
    if s != 1.0:
        delta.mul_(s)
    return fit_shape(delta, shape, "module") if shape is not None else delta


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS' Tucker rebuild: W[p, q, h, w] = sum_ij t[i, j, h, w] wa[i, p] wb[j, q], with
    wa [r, out] and wb [r, in] (in Tucker mode LyCORIS stores both factors rank-first)."""
    return torch.einsum("ijhw,ip,jq->pqhw", t.to(F32), wa.to(F32).flatten(1), wb.to(F32).flatten(1))


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    alpha: float | None,
    shape: Sequence[int],
    t1: Tensor | None = None,
    t2: Tensor | None = None,
) -> Tensor:
    """LyCORIS LoHa: s * (w1a @ w1b) * (w2a @ w2b), r = w1b.shape[0]. With Tucker cores t1/t2 (conv),
    each factor is rebuilt as a full kernel first. float32, shaped to `shape`."""
    rank = w1b.shape[0]
    if t1 is not None and t2 is not None:
        f1 = _tucker(t1, w1a, w1b)  # full kernels [out, in, kh, kw]
        f2 = _tucker(t2, w2a, w2b)
    else:
        f1 = w1a.to(F32).flatten(1) @ w1b.to(F32).flatten(1)
        f2 = w2a.to(F32).flatten(1) @ w2b.to(F32).flatten(1)
    delta = f1 * f2
    s = scale_of(alpha, rank)
    if s != 1.0:
        delta.mul_(s)
    if delta.numel() == _numel(shape) and delta.shape[0] == shape[0]:
        return delta.reshape(shape)
    return fit_shape(delta, shape, "module")


def lokr_delta(
    w1: Tensor | None,
    w1a: Tensor | None,
    w1b: Tensor | None,
    w2: Tensor | None,
    w2a: Tensor | None,
    w2b: Tensor | None,
    alpha: float | None,
    shape: Sequence[int],
    t2: Tensor | None = None,
) -> Tensor:
    """LyCORIS LoKr: kron(w1, w2) * s; each factor full or a product a @ b (w2 with an optional
    Tucker core t2 for convs). s = alpha / r with r the decomposed factor's rank; 1 when both
    factors are full (LyCORIS `lokr.py`: alpha = lora_dim then)."""
    rank = None
    if w1 is None:
        if w1a is None or w1b is None:
            raise WorkbenchError("LoKr module without lokr_w1 or lokr_w1_a/_b")
        rank = w1b.shape[0]
        w1 = w1a.to(F32) @ w1b.to(F32)
    if w2 is None:
        if w2a is None or w2b is None:
            raise WorkbenchError("LoKr module without lokr_w2 or lokr_w2_a/_b")
        rank = w2b.shape[0] if rank is None else rank
        if t2 is not None:
            w2 = _tucker(t2, w2a, w2b)
        else:
            w2 = w2a.to(F32) @ w2b.to(F32).flatten(1)
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    w1, w2 = w1.to(F32), w2.to(F32)
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    delta = torch.kron(w1, w2)
    s = 1.0 if rank is None else scale_of(alpha, rank)
    if s != 1.0:
        delta.mul_(s)
    return fit_shape(delta, shape, "module")


# ---------------------------------------------------------------------------------------------------
# SVD: extract, resize, merge


@dataclass
class LowRank:
    """One module as a kohya LoRA: dW = (alpha / rank) * up @ down (up [out, r], down [r, in...])."""

    up: Tensor
    down: Tensor
    alpha: float
    singular: Tensor  # all singular values of the matrix that was factorised (float32, descending)
    kept: float  # share of the Frobenius norm kept: sqrt(sum S[:r]^2 / sum S^2) (1.0 for a zero matrix)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def flatten_delta(delta: Tensor) -> Tensor:
    """[out, in] view of a weight change (convs: [out, in*kh*kw])."""
    return delta.reshape(delta.shape[0], -1)


OVERSAMPLE = 10  # torch.svd_lowrank's q = rank + OVERSAMPLE
NITER = 4  # power iterations: measured within 0.2% of the exact truncation error on slow spectra
SVD_METHODS = ("auto", "exact", "randomized")


def use_randomized(shape: Sequence[int], rank: int, method: str) -> bool:
    """ "auto" takes the randomized SVD where it saves work: both sides at least twice q = rank + 10."""
    if method not in SVD_METHODS:
        raise WorkbenchError(f"unknown SVD method {method!r}: one of {', '.join(SVD_METHODS)}")
    if method == "auto":
        return min(shape[0], shape[1]) >= 2 * (rank + OVERSAMPLE)
    return method == "randomized"


def svd(
    matrix: Tensor, rank: int | None = None, method: str = "exact", niter: int = NITER
) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of a float32 matrix. "exact": torch.linalg.svd (full_matrices off), all values.
    "randomized": torch.svd_lowrank with q = rank + 10 and `niter` power iterations (only q values;
    its rank-r truncation is an orthogonal projection of the matrix, so its error is still
    sqrt(|M|^2 - sum S_r^2)). "auto": randomized where both sides are at least 2q, else exact."""
    m = matrix.to(F32)
    if rank is None and method != "exact":
        raise WorkbenchError("a randomized SVD needs a rank")
    if use_randomized(m.shape, rank or 1, method):
        q = min(rank + OVERSAMPLE, *m.shape)
        u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
        return u, s, v.T
    return torch.linalg.svd(m, full_matrices=False)


def retained(singular: Tensor, rank: int) -> float:
    """sqrt(sum S[:rank]^2 / sum S^2): the share of the Frobenius norm a rank-`rank` truncation keeps."""
    total = float((singular.double() ** 2).sum())
    if total == 0.0:
        return 1.0
    return (float((singular[:rank].double() ** 2).sum()) / total) ** 0.5


def energy(t: Tensor) -> float:
    """The squared Frobenius norm of a float32 tensor. torch sums float32 pairwise (relative error
    about 1e-7 here), 3x faster than summing a float64 copy; a plain float32 norm or dot product is
    off by 1e-4 to 1e-3 on a 13M-entry weight."""
    return float(t.square().sum())


def low_rank(
    delta: Tensor,
    rank: int,
    method: str = "exact",
    clamp_quantile: float | None = None,
    alpha: float | None = None,
    niter: int = NITER,
    total: float | None = None,
) -> LowRank:
    """Best rank-`rank` factorisation of a weight change (Eckart-Young): up = U_r * S_r, down = Vh_r
    reshaped to the weight's input shape. alpha defaults to the rank (scale 1: all of S sits in up);
    another alpha rescales up so that (alpha / r) * up @ down is unchanged. kohya's quantile clamp
    of up and down is opt-in (`clamp_quantile`, e.g. 0.99); it adds error (LORA.md 2d). `total`:
    the delta's energy when the caller has it (a partial spectrum needs it)."""
    matrix = flatten_delta(delta.to(F32))
    r = max(1, min(rank, *matrix.shape))
    u, s, vh = svd(matrix, r, method, niter)
    if len(s) >= min(matrix.shape):
        total = None  # the full spectrum holds the energy
    elif total is None:  # a partial spectrum: the energy comes from the matrix itself
        total = energy(matrix)
    return _truncate(u, s, vh, r, tuple(delta.shape), clamp_quantile, alpha, total)


def factored_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of up @ down (up [out, r], down [r, in]; convs flattened) from the factors alone:
    QR of up and of down^T, then the SVD of the r x r core. Costs O((out + in) r^2) instead of an
    SVD of the out x in product."""
    up2, down2 = up.to(F32).flatten(1), down.to(F32).flatten(1)
    q1, r1 = torch.linalg.qr(up2)
    q2, r2 = torch.linalg.qr(down2.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, vh @ q2.T


def low_rank_factored(
    up: Tensor, down: Tensor, rank: int, shape: Sequence[int], alpha: float | None = None
) -> LowRank:
    """low_rank of up @ down (no scale) through factored_svd; `shape` is the weight's shape."""
    u, s, vh = factored_svd(up, down)
    r = max(1, min(rank, len(s)))
    return _truncate(u, s, vh, r, tuple(shape), None, alpha)


def _truncate(u, s, vh, r, shape, clamp_quantile, alpha, total: float | None = None) -> LowRank:
    up = u[:, :r] * s[:r]
    down = vh[:r]
    if clamp_quantile is not None:
        values = torch.cat([up.flatten(), down.flatten()])
        hi = torch.quantile(values, clamp_quantile) if values.numel() <= 16_000_000 else values.abs().max()
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    a = float(r) if alpha is None else float(alpha)
    if a != r:
        up = up * (r / a)
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    if total is None:
        kept = retained(s, r)
    else:
        kept = 1.0 if total == 0.0 else min(1.0, float((s[:r].double() ** 2).sum()) / total) ** 0.5
    return LowRank(up.contiguous(), down.contiguous(), a, s, kept)


def pick_rank_fro(
    singular: Tensor, target: float, max_rank: int | None = None, kohya_plus_one: bool = False
) -> int:
    """The smallest k whose rank-k truncation keeps at least `target` of the Frobenius norm
    (sqrt(sum S[:k]^2 / sum S^2) >= target). kohya's resize_lora keeps one more (k + 1); wb takes
    the minimal k unless `kohya_plus_one`. A zero matrix gets rank 1."""
    s2 = singular.double() ** 2
    total = float(s2.sum())
    if total == 0.0 or float(singular[0]) <= 1e-6:
        return 1
    cum = torch.cumsum(s2, 0) / total
    hits = torch.nonzero(cum >= target * target - 1e-12)
    k = int(hits[0]) + 1 if len(hits) else len(singular)
    if kohya_plus_one:
        k = min(k + 1, len(singular))
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, k)


def merge_concat(parts: Sequence[tuple[Tensor, Tensor, float | None, float]]) -> tuple[Tensor, Tensor, float]:
    """Exact merge of (up_i, down_i, alpha_i, m_i): up = [up_i * m_i * s_i], down = [down_i]
    concatenated along the rank, alpha = total rank (scale 1). up @ down = sum m_i s_i up_i @ down_i
    exactly; nothing is squared and nothing is halved (unlike kohya's merge_lora, LORA.md 2c)."""
    ups, downs = [], []
    for up, down, alpha, m in parts:
        r = down.shape[0]
        ups.append(up.to(F32) * (m * scale_of(alpha, r)))
        downs.append(down.to(F32))
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    return up.contiguous(), down.contiguous(), float(down.shape[0])
