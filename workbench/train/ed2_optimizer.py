"""What EveryDream2 (ED2) makes of an optimizer json: each component's optimizer, hyper-parameters
and lr schedule, resolved the way ED2's own code resolves them (victorchall/EveryDream2trainer,
optimizer/optimizers.py, May 2025; the flat format of 2023-03 to 2023-05 as train.py of that time).

The rules, from ED2's code (not its docs, where they differ):
- `base` is the UNet's section, `text_encoder_overrides` the text encoder's. train.json's `lr`, when
  set, replaces the lr of BOTH. Its `lr_scheduler`, `lr_warmup_steps` and `lr_decay_steps` only fill
  what `base` leaves null (or 0/""): the optimizer json wins.
- lr_decay_steps null or < 1 in train.json: int(1.5 x the run's micro-batches); lr_warmup_steps null
  in train.json: int(decay / 50). Both are counted in micro-batches (the schedulers step once per
  batch, whatever grad_accum is).
- The text encoder's optimizer, lr, lr_scheduler, warmup, decay, weight_decay, betas and epsilon are
  `override or base`: null, 0, false and "" all inherit. Its other settings (d0, decouple, momentum,
  growth_rate, safeguard_warmup) come from the override section or ED2's defaults, never the base.
- Prodigy: use_bias_correction is always on; safeguard_warmup on unless the section says otherwise;
  betas and eps are not passed (Prodigy's own defaults).
- An unknown optimizer name trains AdamW8bit (bitsandbytes), as in ED2.
- Flat format (`optimizer`, `lr`, `betas`, `epsilon`, `weight_decay`, `text_encoder_lr_scale` at the
  top): one optimizer for both, the text encoder at lr x text_encoder_lr_scale, train.json's schedule
  for both; "lion" is Lion, "adamw" AdamW, anything else AdamW8bit.

Values here are plain dicts of recipe fields; ed2.py turns them into a recipe and the account of
keys. "auto" decay/warmup stand for ED2's run-length defaults (decay_run_multiple 1.5, warmup
decay // 50 in wb's schedule fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError

AUTO = "auto"
DECAY_RUN_MULTIPLE = 1.5
WARMUP_DECAY_DIVISOR = 50
ED2_LR_DEFAULT = 1e-6
ED2_DEFAULTS = {"betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.01}
# The settings _create_optimizer reads from a section with its own default (never from the base).
ED2_EXTRAS = {
    "d0": 1e-6,
    "decouple": True,
    "momentum": 0.0,
    "growth_rate": float("inf"),
    "safeguard_warmup": True,
}
PRODIGY_FIXED = {"betas": [0.9, 0.999], "eps": 1e-8, "use_bias_correction": True, "decouple": True}
# What ED2 passes to each optimizer it builds (besides lr), as wb option names.
PASSED = {
    "adamw": ("betas", "eps", "weight_decay"),
    "adamw8bit": ("betas", "eps", "weight_decay"),
    "lion": ("betas", "weight_decay"),
    "lion8bit": ("betas", "weight_decay"),
    "prodigy": ("weight_decay", "growth_rate", "d0", "safeguard_warmup"),
    "dadapt_adam": ("betas", "weight_decay", "eps", "d0", "growth_rate", "decouple"),
    "dadapt_lion": ("betas", "weight_decay", "d0"),
    "dadapt_sgd": ("momentum", "weight_decay", "d0", "growth_rate"),
}
UNSUPPORTED = ("dadapt_adan", "adacoor", "coordinate_dowg", "scalar_dowg")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SECTION_KEYS = {"optimizer", "lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "betas", "epsilon",
                "weight_decay", "d0", "decouple", "momentum", "growth_rate", "safeguard_warmup",
                "no_prox"}  # fmt: skip


@dataclass
class Component:
    """One component's optimizer and schedule as ED2 runs them (steps in micro-batches)."""

    optimizer: str
    lr: float
    options: dict[str, Any]
    scheduler: str
    warmup: int | str  # micro-batches, or AUTO (decay // 50)
    decay: int | str  # micro-batches, or AUTO (1.5 x the run)
    notes: list[str] = field(default_factory=list)


@dataclass
class Resolved:
    unet: Component
    text_encoder: Component
    notes: list[str] = field(default_factory=list)  # where wb says what ED2 does differently from its docs
    warnings: list[str] = field(default_factory=list)  # where wb cannot do what ED2 does


def train_schedule_args(cfg: dict) -> tuple[str, int | str, int | str]:
    """train.json's lr_scheduler, warmup and decay after ED2's defaulting (get_final_optimizer_configs)."""
    scheduler = cfg.get("lr_scheduler") if "lr_scheduler" in cfg else "constant"
    decay = cfg.get("lr_decay_steps", 0)
    decay = AUTO if decay is None or decay < 1 else int(decay)
    warmup = cfg.get("lr_warmup_steps")
    if warmup is None:
        warmup = AUTO if decay == AUTO else int(decay / WARMUP_DECAY_DIVISOR)
    return scheduler, warmup, decay


def _name(value: Any, where: str, warnings: list[str]) -> str:
    name = str(value).lower()
    if name in UNSUPPORTED:
        raise WorkbenchError(
            f"{where}: optimizer {value!r}: wb has no {name} (EveryDream2 does); choose another"
        )
    if "dowg" in name:
        raise WorkbenchError(f"{where}: optimizer {value!r}: EveryDream2 itself refuses this name")
    if name not in PASSED:
        warnings.append(
            f"{where}={value!r}: EveryDream2 trains an unknown name as adamw8bit; so does the import"
        )
        return "adamw8bit"
    return name


def _options(name: str, section: dict, base: dict | None) -> dict[str, Any]:
    """The hyper-parameters ED2 passes to `name`, from a (merged) section; base None for the UNet."""
    value = {
        "betas": list(section.get("betas") or ED2_DEFAULTS["betas"]),
        "eps": section.get("epsilon") if section.get("epsilon") is not None else ED2_DEFAULTS["epsilon"],
        "weight_decay": section.get("weight_decay")
        if section.get("weight_decay") is not None
        else ED2_DEFAULTS["weight_decay"],
    }
    for key, default in ED2_EXTRAS.items():
        value[key] = section.get(key) if section.get(key) is not None else default
    options = {k: value[k] for k in PASSED[name]}
    if name == "prodigy":
        options.update(PRODIGY_FIXED)
    return options


def resolve(opt: dict, cfg: dict, where: str) -> Resolved:
    """The current (split) format: `base` + `text_encoder_overrides`."""
    warnings: list[str] = []
    notes: list[str] = []
    args_lr = cfg.get("lr")
    scheduler, warmup, decay = train_schedule_args(cfg)
    base = dict(opt.get("base") or {})
    te = dict(opt.get("text_encoder_overrides") or {})
    if args_lr is not None:
        base["lr"] = args_lr
    base["optimizer"] = base.get("optimizer") or "adamw8bit"
    base["lr_decay_steps"] = base.get("lr_decay_steps") or decay
    base["lr_scheduler"] = base.get("lr_scheduler") or scheduler
    base["lr_warmup_steps"] = base.get("lr_warmup_steps") or warmup
    for key in ("lr", "optimizer", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "weight_decay",
                "betas",
                "epsilon"):  # fmt: skip
        te[key] = te.get(key) or base.get(key)
    components = {}
    for label, section, over in (("unet", base, None), ("text_encoder", te, base)):
        sec_where = f"{where}{'base' if over is None else 'text_encoder_overrides'}.optimizer"
        name = _name(section["optimizer"], sec_where, warnings)
        lr = args_lr if args_lr is not None else section.get("lr")
        lr = ED2_LR_DEFAULT if lr is None else float(lr)
        components[label] = Component(
            optimizer=name,
            lr=lr,
            options=_options(name, section, over),
            scheduler=_schedule_name(section["lr_scheduler"], where),
            warmup=section["lr_warmup_steps"] or 0,
            decay=section["lr_decay_steps"],
        )
    if name_differs := [
        k for k in ("betas", "epsilon") if base.get(k) and components["unet"].optimizer == "prodigy"
    ]:
        notes.append(
            f"{where}base.{'/'.join(name_differs)}: EveryDream2 does not pass them to Prodigy "
            "(Prodigy's defaults 0.9/0.999 and 1e-8 train)"
        )
    return Resolved(components["unet"], components["text_encoder"], notes, warnings)


def resolve_flat(opt: dict, cfg: dict, where: str) -> Resolved:
    """The flat format of 2023-03..05: one optimizer for both, the TE lr scaled."""
    notes: list[str] = []
    warnings: list[str] = []
    raw = opt.get("optimizer")
    name = {"lion": "lion", "adamw": "adamw"}.get(str(raw), "adamw8bit")
    if raw not in ("lion", "adamw", "adamw8bit"):
        warnings.append(
            f"{where}optimizer={raw!r}: EveryDream2 of that time trained it as adamw8bit; so does the import"
        )
    lr = cfg.get("lr") if cfg.get("lr") is not None else opt.get("lr")
    lr = ED2_LR_DEFAULT if lr is None else float(lr)
    scale = opt.get("text_encoder_lr_scale")
    scale = 1.0 if scale is None else float(scale)
    te_lr = lr if cfg.get("disable_unet_training") else lr * scale
    section = {
        "betas": opt.get("betas"),
        "epsilon": opt.get("epsilon"),
        "weight_decay": opt.get("weight_decay"),
    }
    options = _options(name, section, None)
    scheduler, warmup, decay = train_schedule_args(cfg)
    scheduler = _schedule_name(scheduler, "train.json:")
    unet = Component(name, lr, options, scheduler, warmup, decay)
    text_encoder = Component(name, te_lr, dict(options), scheduler, warmup, decay)
    if scale != 1.0:
        notes.append(
            f"{where}text_encoder_lr_scale {scale:g}: text encoder lr {lr:g} x {scale:g} = {te_lr:g}"
        )
    return Resolved(unet, text_encoder, notes, warnings)


def is_flat(opt: dict) -> bool:
    return "base" not in opt and any(
        k in opt for k in ("optimizer", "lr", "betas", "epsilon", "weight_decay")
    )


def _schedule_name(value: Any, where: str) -> str:
    if value not in SCHEDULES:
        raise WorkbenchError(
            f"{where}lr_scheduler: {value!r} is not a schedule EveryDream2 and wb share "
            f"({', '.join(SCHEDULES)})"
        )
    return value


def schedule_fields(c: Component, grad_accum: int, notes: list[str], label: str) -> dict:
    """A component's schedule as wb recipe fields, in optimizer steps."""
    out: dict[str, Any] = {"name": c.scheduler}
    if c.scheduler == "constant":
        return out
    decays = c.scheduler != "constant_with_warmup"
    if c.decay == AUTO:
        if decays:
            out["decay_run_multiple"] = DECAY_RUN_MULTIPLE
    elif decays:
        out["decay_steps"] = max(1, round(c.decay / grad_accum))
    if c.warmup == AUTO:
        if c.decay == AUTO or not decays:
            out["warmup_decay_divisor"] = WARMUP_DECAY_DIVISOR
            if not decays:
                out["decay_run_multiple"] = DECAY_RUN_MULTIPLE
        else:  # decay set here, warmup from train.json's auto decay: not expressible exactly
            out["warmup_decay_divisor"] = WARMUP_DECAY_DIVISOR
            notes.append(
                f"{label} warmup: EveryDream2 warms up over 1/50 of 1.5x the run (train.json's decay), "
                "wb over "
                f"1/50 of this schedule's decay_steps"
            )
    elif c.warmup:
        out["warmup_steps"] = round(c.warmup / grad_accum)
    if grad_accum > 1 and (isinstance(c.warmup, int) and c.warmup or isinstance(c.decay, int)):
        notes.append(
            f"{label} schedule: EveryDream2 counts warmup/decay in micro-batches; with grad_accum "
            f"{grad_accum} wb's are optimizer steps: warmup {c.warmup} -> "
            f"{out.get('warmup_steps', 'decay // 50')}"
            f", decay {c.decay} -> {out.get('decay_steps', 'auto')}"
        )
    if c.scheduler == "polynomial":
        if c.lr <= 1e-7:
            raise WorkbenchError(
                f"{label}: polynomial schedule at lr {c.lr:g}: EveryDream2 refuses an lr <= 1e-7"
            )
        out["end_ratio"] = 1e-7 / c.lr  # diffusers' get_scheduler fixes lr_end at 1e-7
    return out
