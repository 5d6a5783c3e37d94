"""Merge methods: each one plain function of float32 tensors, registered by name with its formula.

This is the only place where merge formulas live. Conventions (shared/docs/FORMATS.md): `alpha` is
the share of B, as in A1111, supermerger and sd-mecha (ComfyUI's ModelMergeSimple means the opposite).

Contract with the engine, for speed (fresh allocations are what make merges slow):
- the arguments are float32 scratch tensors owned by the caller; a method may overwrite any of them
  and may return one of them as its result;
- the elementwise methods compute each element from the same elements of the inputs, so the engine
  may call them on any slice of a tensor (it streams cache-sized chunks through them);
- every result is written as a fixed sequence of single-rounding float32 operations, in the order
  the formula string reads, so a test can reproduce it exactly with plain torch expressions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from workbench.errors import WorkbenchError


def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    a.mul_(1 - alpha)
    b.mul_(alpha)
    return a.add_(b)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float) -> torch.Tensor:
    b.sub_(c)
    b.mul_(alpha)
    return a.add_(b)


def triple_sum(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float, beta: float
) -> torch.Tensor:
    a.mul_(1 - alpha - beta)
    b.mul_(alpha)
    a.add_(b)
    c.mul_(beta)
    return a.add_(c)


def sum_twice(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float, beta: float
) -> torch.Tensor:
    a.mul_(1 - alpha)
    b.mul_(alpha)
    a.add_(b)
    a.mul_(1 - beta)
    c.mul_(beta)
    return a.add_(c)


# Below this cosine the two tensors are far enough from parallel for sin(omega) to be well conditioned.
SLERP_PARALLEL_COS = 0.9995


def slerp(a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Spherical interpolation of the whole tensor, treated as one vector (as sd-mecha and mergekit do)."""
    import torch

    norm_a = torch.linalg.vector_norm(a).item()
    norm_b = torch.linalg.vector_norm(b).item()
    if norm_a == 0.0 or norm_b == 0.0:
        return weighted_sum(a, b, alpha=alpha)
    cos = (torch.dot(a.reshape(-1), b.reshape(-1)).item() / (norm_a * norm_b)) if a.numel() else 1.0
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > SLERP_PARALLEL_COS:
        return weighted_sum(a, b, alpha=alpha)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    a.mul_(math.sin((1 - alpha) * omega) / sin_omega)
    b.mul_(math.sin(alpha * omega) / sin_omega)
    return a.add_(b)


def _trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries with the largest magnitude; zero the rest (TIES step 1)."""
    import torch

    n = delta.numel()
    keep = math.ceil(density * n)
    if keep >= n:
        return delta
    if keep <= 0:
        return delta.zero_()
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, n - keep + 1).values
    return delta.mul_(delta.abs() >= threshold)


def ties(base: torch.Tensor, *models: torch.Tensor, density: float, lam: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) on the deltas of each model against the base, per tensor."""
    import torch

    deltas = [_trim_to_density(m.sub_(base), density) for m in models]
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    elected = torch.sign(total)  # the sign with the larger total mass (TIES step 2)
    summed = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for d in deltas:  # disjoint mean: average only the entries that agree with the elected sign (step 3)
        agree = torch.sign(d) == elected
        summed.add_(d * agree)
        count.add_(agree & (d != 0))
    merged = summed.div_(count.clamp_(min=1))
    return base.add_(merged.mul_(lam))


def key_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (seed, key) only, so a key's random draws never depend on thread order."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def dare(
    base: torch.Tensor, *models: torch.Tensor, drop: float, lam: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each delta entry with probability `drop`, rescale the survivors by
    1 / (1 - drop), and add the sum of the models' deltas to the base (task arithmetic), scaled by lam."""
    import torch

    total = torch.zeros_like(base)
    for m in models:
        delta = m.sub_(base)
        keep = torch.rand(delta.shape, generator=generator) >= drop
        total.add_(delta.mul_(keep).div_(1 - drop))
    return base.add_(total.mul_(lam))


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    formula: str
    params: dict[str, float]  # parameter -> default; the engine passes them as keyword arguments
    n_inputs: int | None  # None: a base and one or more models
    weight_param: str  # the parameter that per-component alphas and block weights override
    elementwise: bool  # may run on any slice of a tensor
    summary: str
    uses_seed: bool = False
    aliases: tuple[str, ...] = field(default=())

    def input_roles(self, n: int) -> list[str]:
        if self.n_inputs is None:
            return ["base"] + [f"M{i}" for i in range(1, n)]
        return ["A", "B", "C"][:n]

    def call(self, tensors: list[torch.Tensor], params: dict[str, float], key: str) -> torch.Tensor:
        kwargs = {PY_NAMES.get(p, p): float(v) for p, v in params.items() if p != "seed"}
        if self.uses_seed:
            kwargs["generator"] = key_generator(int(params.get("seed", 0)), key)
        return self.fn(*tensors, **kwargs)


# Recipe and CLI parameter names that are not valid Python keyword arguments.
PY_NAMES = {"lambda": "lam"}

METHODS: dict[str, Method] = {}


def _register(method: Method) -> None:
    METHODS[method.name] = method


_register(Method(
    name="weighted", fn=weighted_sum, formula="(1 - alpha) * A + alpha * B",
    params={"alpha": 0.5}, n_inputs=2, weight_param="alpha", elementwise=True,
    summary="weighted sum; alpha is the share of B", aliases=("weighted_sum", "weighted-sum"),
))  # fmt: skip
_register(Method(
    name="add-diff", fn=add_difference, formula="A + alpha * (B - C)",
    params={"alpha": 1.0}, n_inputs=3, weight_param="alpha", elementwise=True,
    summary="add the difference B - C to A", aliases=("add_difference", "add-difference", "add_diff"),
))  # fmt: skip
_register(Method(
    name="triple-sum", fn=triple_sum, formula="(1 - alpha - beta) * A + alpha * B + beta * C",
    params={"alpha": 0.33, "beta": 0.33}, n_inputs=3, weight_param="alpha", elementwise=True,
    summary="weighted sum of three models", aliases=("triple_sum",),
))  # fmt: skip
_register(Method(
    name="sum-twice", fn=sum_twice, formula="(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C",
    params={"alpha": 0.5, "beta": 0.5}, n_inputs=3, weight_param="alpha", elementwise=True,
    summary="weighted sum of A and B, then with C", aliases=("sum_twice",),
))  # fmt: skip
_register(Method(
    name="slerp", fn=slerp,
    formula="sin((1 - alpha) * W) / sin(W) * A + sin(alpha * W) / sin(W) * B, W = angle between A and B "
    "per tensor (the weighted sum when A and B are nearly parallel)",
    params={"alpha": 0.5}, n_inputs=2, weight_param="alpha", elementwise=False,
    summary="spherical interpolation per tensor",
))  # fmt: skip
_register(Method(
    name="ties", fn=ties,
    formula="base + lambda * disjoint_mean(elect_sign(trim_to_density(M_i - base))) per tensor",
    params={"density": 0.2, "lambda": 1.0}, n_inputs=None, weight_param="lambda", elementwise=False,
    summary="TIES-merging of the models' deltas against the base",
))  # fmt: skip
_register(Method(
    name="dare", fn=dare,
    formula="base + lambda * sum_i(keep_i * (M_i - base) / (1 - drop)), keep_i ~ Bernoulli(1 - drop) "
    "drawn from a generator seeded by (seed, key)",
    params={"drop": 0.5, "lambda": 1.0, "seed": 0}, n_inputs=None, weight_param="lambda", elementwise=False,
    summary="DARE: random drop and rescale of the models' deltas against the base", uses_seed=True,
))  # fmt: skip


def _lora_step(a: torch.Tensor, b: torch.Tensor, *, strength: float) -> torch.Tensor:
    raise WorkbenchError("the lora method is evaluated by the merge engine (workbench/lora/bake.py)")


# A LoRA file B baked into a model A. Its math is the LoRA's (workbench/lora/math.py); the engine
# binds B to A's keys from the headers and adds the deltas to each key it changes.
_register(Method(
    name="lora", fn=_lora_step,
    formula="A + strength * sum over B's modules of (alpha / rank) * up @ down, reshaped to the weight "
    "(fused q/k/v: each on its rows)",
    params={"strength": 1.0}, n_inputs=2, weight_param="strength", elementwise=False,
    summary="bake a LoRA file (B) into a model (A) at a strength", aliases=("lora-bake", "bake"),
))  # fmt: skip

LORA_METHOD = "lora"


def get_method(name: str) -> Method:
    found = METHODS.get(name)
    if found is not None:
        return found
    wanted = name.strip().lower()
    for method in METHODS.values():
        if wanted == method.name or wanted in method.aliases:
            return method
    raise WorkbenchError(f"unknown merge method {name!r}: one of {', '.join(METHODS)}")


def check_params(method: Method, params: dict[str, float], where: str) -> dict[str, float]:
    """Fill in defaults and refuse unknown or out-of-range parameters, naming the field."""
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        raise WorkbenchError(
            f"{where}: {method.name} takes no parameter {unknown[0]!r} (it takes {', '.join(method.params)})"
        )
    full = {**method.params, **params}
    for p, v in full.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise WorkbenchError(f"{where}: {p} must be a finite number, got {v!r}")
    if "drop" in full and not 0.0 <= full["drop"] < 1.0:
        raise WorkbenchError(f"{where}: drop must be in [0, 1), got {full['drop']}")
    if "density" in full and not 0.0 < full["density"] <= 1.0:
        raise WorkbenchError(f"{where}: density must be in (0, 1], got {full['density']}")
    if "seed" in full:
        if full["seed"] != int(full["seed"]):
            raise WorkbenchError(f"{where}: seed must be an integer, got {full['seed']}")
        full["seed"] = int(full["seed"])
    return full
