"""Optimizers by name, one per trained component, and the text encoder's freezing rules.

The UNet and the text encoder each get their OWN optimizer (and schedule), not two parameter
groups of one. Decoupled rates need it: D-Adaptation and Prodigy refuse param groups with
different non-zero lrs ("only supported for values of 0") and read betas, d0 and growth_rate from
the first group only, so one shared optimizer would silently give the text encoder the UNet's
settings. With one optimizer each, every setting in `optimizer.text_encoder` really applies, and
each component gets its own adapted step `d`, logged as `lr/d*lr/<component>`.

A component whose lr is 0 does not move: it is frozen (requires_grad False) and gets no optimizer,
which is exactly "lr 0", bit for bit, and saves its backward pass. (EveryDream2 silently replaced a
text-encoder lr of 0 with the UNet's; wb never does.)

Heavy imports (bitsandbytes, dadaptation, prodigyopt, lion_pytorch) happen only in the factory
of the optimizer that is asked for.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

# Every option a recipe's optimizer section may set besides `name` and `lr`.
OPTION_NAMES = (
    "betas",
    "eps",
    "weight_decay",
    "momentum",
    "d0",
    "decouple",
    "growth_rate",
    "safeguard_warmup",
    "use_bias_correction",
)


@dataclass(frozen=True)
class OptimizerSpec:
    """What the recipe may set for one optimizer, wb's defaults for it, and how to build it."""

    name: str
    options: tuple[str, ...]  # accepted options (besides lr); setting any other one is an error
    defaults: Mapping[str, Any]  # used for every option (and lr) the recipe leaves unset
    adaptive: bool  # D-Adaptation / Prodigy: lr multiplies the adapted step d
    make: Callable[..., torch.optim.Optimizer]
    what: str  # one line for the docs and `--help`


def _adamw(params, **kw):
    import torch

    return torch.optim.AdamW(params, **kw)


def _bnb(cls_name: str, name: str):
    def make(params, **kw):
        try:
            import bitsandbytes as bnb
        except Exception as e:  # a broken CUDA setup raises all sorts of errors at import
            raise WorkbenchError(
                f"optimizer {name}: bitsandbytes could not be loaded ({type(e).__name__}: {e}); "
                "use adamw or lion instead"
            ) from None
        optimizer = getattr(bnb.optim, cls_name)(params, **kw)
        _probe_8bit(name, cls_name, params)
        return optimizer

    return make


def _probe_8bit(name: str, cls_name: str, params) -> None:
    """Run one step of the 8-bit optimizer on a throwaway tensor on the training device.

    bitsandbytes decides per device whether its kernels exist; without this check an unsupported
    device fails deep inside the first training step with an error that does not say which option
    caused it. 4096 elements is bitsandbytes' threshold for keeping the state in 8 bits.
    """
    import bitsandbytes as bnb
    import torch

    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    probe = torch.nn.Parameter(torch.zeros(4096, device=first.device, dtype=torch.float32))
    probe.grad = torch.ones_like(probe)
    try:
        getattr(bnb.optim, cls_name)([probe], lr=1e-3).step()
    except Exception as e:
        raise WorkbenchError(
            f"optimizer {name}: bitsandbytes' 8-bit optimizer does not run on {first.device.type} here "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use adamw or lion, "
            "or train on a CUDA GPU"
        ) from None


def _lion(params, **kw):
    from lion_pytorch import Lion

    return Lion(params, **kw)


def _quiet(factory: Callable[..., torch.optim.Optimizer]):
    """D-Adaptation and Prodigy print to the console (Prodigy already in its constructor). wb logs
    d*lr to TensorBoard instead; log_every=0 silences the per-step lines, this the rest."""

    def make(params, **kw):
        with contextlib.redirect_stdout(io.StringIO()):
            return factory(params, **kw)

    return make


def _dadapt(cls_name: str):
    def make(params, **kw):
        import dadaptation

        return getattr(dadaptation, cls_name)(params, log_every=0, **kw)

    return _quiet(make)


def _prodigy(params, **kw):
    from prodigyopt import Prodigy

    return Prodigy(params, **kw)


_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
_DADAPT = {"d0": 1e-6}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw", ("betas", "eps", "weight_decay"), {"lr": 1e-6, **_ADAM}, False, _adamw,
                      "torch AdamW, full precision"),
        OptimizerSpec("adamw8bit", ("betas", "eps", "weight_decay"), {"lr": 1e-6, **_ADAM}, False,
                      _bnb("AdamW8bit", "adamw8bit"), "bitsandbytes AdamW with 8-bit state"),
        OptimizerSpec("lion", ("betas", "weight_decay"),
                      {"lr": 1e-7, "betas": (0.9, 0.99), "weight_decay": 0.1}, False, _lion,
                      "lucidrains' Lion (no eps); ~1/10 the lr and ~10x the weight decay of AdamW"),
        OptimizerSpec("lion8bit", ("betas", "weight_decay"),
                      {"lr": 1e-7, "betas": (0.9, 0.99), "weight_decay": 0.1}, False,
                      _bnb("Lion8bit", "lion8bit"), "bitsandbytes Lion with 8-bit state"),
        OptimizerSpec("dadapt_adam",
                      ("betas", "eps", "weight_decay", "d0", "decouple", "growth_rate",
                       "use_bias_correction"),
                      {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "decouple": True,
                       "use_bias_correction": False, **_DADAPT}, True, _dadapt("DAdaptAdam"),
                      "D-Adaptation Adam: lr is a multiplier of the adapted step"),
        OptimizerSpec("dadapt_lion", ("betas", "weight_decay", "d0"),
                      {"lr": 1.0, "betas": (0.9, 0.99), "weight_decay": 0.0, **_DADAPT}, True,
                      _dadapt("DAdaptLion"), "D-Adaptation Lion"),
        OptimizerSpec("dadapt_sgd", ("momentum", "weight_decay", "d0", "growth_rate"),
                      {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, **_DADAPT}, True,
                      _dadapt("DAdaptSGD"), "D-Adaptation SGD"),
        OptimizerSpec("prodigy",
                      ("betas", "eps", "weight_decay", "d0", "decouple", "growth_rate", "safeguard_warmup",
                       "use_bias_correction"),
                      {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "decouple": True,
                       "use_bias_correction": False, "safeguard_warmup": False, **_DADAPT}, True,
                      _quiet(_prodigy), "Prodigy: lr is a multiplier of the adapted step"),
    )
}  # fmt: skip


def optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}") from None


@dataclass(frozen=True)
class OptimizerSettings:
    """The resolved settings of one component's optimizer: what is built and what run.json records."""

    name: str
    lr: float
    options: dict[str, Any]  # only options this optimizer accepts, unset ones filled with defaults

    @property
    def spec(self) -> OptimizerSpec:
        return OPTIMIZERS[self.name]

    def to_json(self) -> dict:
        return {"name": self.name, "lr": self.lr, **{k: _jsonable(v) for k, v in self.options.items()}}


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return v


def build_optimizer(settings: OptimizerSettings, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """One optimizer over `params` (one param group) with `settings`."""
    if not params:
        raise WorkbenchError(f"optimizer {settings.name}: no trainable parameters were given to it")
    return settings.spec.make(params, lr=settings.lr, **settings.options)


def adapted_lr(optimizer: torch.optim.Optimizer, lr: float | None = None) -> float | None:
    """d * lr, the step size D-Adaptation / Prodigy actually use (None for the other optimizers).

    That is the number users want to compare with a hand-picked AdamW lr (kohya logs it as
    `lr/d*lr/<group>`); the configured lr alone is only a multiplier. `lr` defaults to the group's
    current (scheduled) lr.
    """
    group = optimizer.param_groups[0]
    if "d" not in group:
        return None
    return float(group["d"]) * float(group["lr"] if lr is None else lr)


# --- freezing -----------------------------------------------------------------------------------


def freeze_text_encoder(
    text_encoder: torch.nn.Module,
    unfreeze_last_n_layers: int | None,
    freeze_embeddings: bool | str,
    freeze_final_layer_norm: bool,
    freeze_first_n_layers: int | None = None,
) -> None:
    """Set requires_grad False on the frozen parts of a (trained) HF CLIP text encoder.

    unfreeze_last_n_layers=None trains every encoder layer; n trains only the last n (0: none).
    freeze_first_n_layers=n instead freezes the first n. freeze_embeddings "auto" (EveryDream2's
    rule) freezes the embeddings when any layer is frozen.
    Frozen parameters stay out of the optimizer, so weight decay cannot touch them either: they
    come out of training bit-identical.
    """
    # transformers 5 keeps the parts on CLIPTextModel itself; 4.x under `.text_model`
    text_model = getattr(text_encoder, "text_model", text_encoder)
    if not all(hasattr(text_model, part) for part in ("embeddings", "encoder", "final_layer_norm")):
        raise WorkbenchError(f"text_encoder freezing: {type(text_encoder).__name__} is not a CLIP text model")
    layers = text_model.encoder.layers
    frozen = 0
    if unfreeze_last_n_layers is not None:
        frozen = max(0, len(layers) - unfreeze_last_n_layers)
    elif freeze_first_n_layers is not None:
        frozen = min(len(layers), freeze_first_n_layers)
    for layer in layers[:frozen]:
        layer.requires_grad_(False)
    if freeze_embeddings == "auto":
        freeze_embeddings = frozen > 0
    if freeze_embeddings:
        text_model.embeddings.requires_grad_(False)
    if freeze_final_layer_norm:
        text_model.final_layer_norm.requires_grad_(False)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
