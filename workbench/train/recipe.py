"""The training recipe: a YAML file validated by a pydantic schema, plus `--set a.b=value` overrides.

Every section forbids unknown fields, so a typo is an error naming it
("recipes/x.yaml: optimizer.lrr: unknown field (did you mean lr?)") instead of a setting that
silently does nothing. Options that exist but do not apply (eps for lion, power for a cosine
schedule) are errors too when they are set explicitly. The resolved recipe (defaults filled in)
is what run.json records, so a run says exactly what ran.

Sections: model, data, validation, optimizer (base + text_encoder overrides), schedule,
text_encoder, unet, training, saving, sampling, logging. See docs/train.md for every field.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workbench.documents import load_yaml_file, parse_yaml
from workbench.errors import WorkbenchError
from workbench.train.optimizers import OPTIMIZERS, OPTION_NAMES, OptimizerSettings, optimizer_spec

TOY_MODEL = "toy:init"
TOY_DATA = "toy:shapes"
COMPONENTS = ("unet", "text_encoder")

# Schedules that come from diffusers' get_scheduler, and wb's own (see schedules.py).
DIFFUSERS_SCHEDULES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
WB_SCHEDULES = ("linear_ramp", "triangular", "triangular2")
ScheduleName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "linear_ramp", "triangular", "triangular2",
]  # fmt: skip


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _only_when(section: BaseModel, fields: tuple[str, ...], ok: bool, why: str) -> None:
    """Refuse `fields` set to anything but their default where they have no effect (the error names
    the first one). Defaults pass, so a resolved recipe (every default written out) still loads."""
    for name in fields:
        if not ok and getattr(section, name) != type(section).model_fields[name].default:
            raise ValueError(f"{name}: {why}")


# --- model and data -----------------------------------------------------------------------------


class ModelSection(Section):
    base: str = Field(
        description=f"checkpoint to fine-tune (.safetensors, .ckpt, diffusers folder) or {TOY_MODEL}"
    )
    init_seed: int = Field(0, description=f"seed of the fresh toy model when base is {TOY_MODEL}")

    @model_validator(mode="after")
    def _toy_only(self):
        _only_when(self, ("init_seed",), self.base == TOY_MODEL, f"only used with base {TOY_MODEL}")
        return self


class ToyDataSection(Section):
    n: int = Field(64, ge=2, description="number of procedural images")
    seed: int = 0
    shapes: list[str] | None = None
    fg: list[str] | None = None
    bg: list[str] | None = None


class DataSection(Section):
    root: str = Field(description=f"folder of images with .txt/.caption sidecars, or {TOY_DATA}")
    layout: Literal["auto", "folders", "kohya"] = Field(
        "auto", description="kohya: N_name folders (repeats, class tokens); folders: ED2's; auto: guess"
    )
    caption_extension: str | None = Field(
        None, description="the caption sidecar's extension (kohya's option); default .txt, else .caption"
    )
    resolution: int = Field(512, ge=8, description="images are resized (shorter side) and center-cropped")
    aspect_buckets: bool = Field(False, description="train each image at its nearest aspect ratio")
    bucket_step: int = Field(64, ge=8, description="bucket sides are multiples of this")
    max_aspect: float = Field(2.5, ge=1, description="the widest bucket's width/height (and tallest's h/w)")
    bucket_set: Literal["wb", "ed2"] = Field(
        "wb", description="ed2: EveryDream2's table of buckets for the resolution (up to 4:1) instead"
    )
    toy: ToyDataSection = ToyDataSection()
    flip_p: float = Field(0.0, ge=0, le=1)
    cond_dropout: float = Field(0.0, ge=0, le=1, description="chance a caption is replaced by ''")
    shuffle_tags: bool = Field(False, description="shuffle comma-separated tags after the first")
    shuffle_caption: bool = Field(False, description="kohya's: shuffle the tags after the first keep_tokens")
    keep_tokens: int = Field(0, ge=0, description="this many leading tags stay in place (kohya's option)")
    caption_tag_dropout_rate: float = Field(
        0.0, ge=0, lt=1, description="chance each tag after keep_tokens is left out (kohya's option)"
    )
    workers: int = Field(0, ge=0, description="DataLoader worker processes decoding images")
    random_crop: bool = Field(False, description="crop at a random place, not the center, each visit")
    cache_latents: Literal["off", "memory", "disk"] = Field(
        "off", description="encode each image with the VAE once (see docs/train.md): memory or disk"
    )

    @model_validator(mode="after")
    def _toy_only(self):
        _only_when(self, ("toy",), self.root == TOY_DATA, f"only used with root {TOY_DATA}")
        _only_when(self, ("layout", "caption_extension"), self.root != TOY_DATA, "only for a folder root")
        if self.shuffle_tags and self.shuffle_caption:
            raise ValueError(
                "shuffle_tags: ED2's name for shuffle_caption with the first tag kept; set one of them"
            )
        tagged = self.shuffle_tags or self.shuffle_caption or self.caption_tag_dropout_rate > 0
        _only_when(self, ("keep_tokens",), tagged, "only used with shuffle_caption, shuffle_tags or "
                   "caption_tag_dropout_rate")  # fmt: skip
        if self.caption_extension is not None and not self.caption_extension.strip(". "):
            raise ValueError("caption_extension: give an extension such as .txt or .caption")
        _only_when(
            self,
            ("bucket_step", "max_aspect", "bucket_set"),
            self.aspect_buckets,
            "only used with aspect_buckets",
        )
        _only_when(self, ("bucket_step", "max_aspect"), self.bucket_set == "wb", "not used by bucket_set ed2")
        if self.random_crop and self.root == TOY_DATA:
            raise ValueError(f"random_crop: {TOY_DATA} images are drawn at the training size, uncropped")
        if self.random_crop and self.cache_latents != "off":
            raise ValueError(
                f"cache_latents: {self.cache_latents} caches one crop of each image, but random_crop "
                "takes a new one at every visit; set data.cache_latents: off or data.random_crop: false"
            )
        if self.aspect_buckets and self.root == TOY_DATA:
            raise ValueError(f"aspect_buckets: {TOY_DATA} images are all square")
        if self.aspect_buckets and self.bucket_set == "wb" and self.resolution % self.bucket_step:
            raise ValueError(
                f"bucket_step: resolution {self.resolution} is not a multiple of {self.bucket_step}"
            )
        return self


class ValidationSection(Section):
    enabled: bool = True
    split: float = Field(0.15, gt=0, lt=1, description="share of the data held out, fixed by seed")
    split_round_up: bool = Field(
        False, description="hold out ceil(split x n) examples (EveryDream2), not round"
    )
    root: str | None = Field(None, description="a folder of validation images instead of a split of the data")
    seed: int = 555
    every_n_epochs: float | None = Field(
        1, gt=0, description="evaluate every N epochs; under 1, 1/N times per epoch (0.5: twice)"
    )
    every_n_steps: int | None = Field(None, ge=1)
    at_start: bool = Field(True, description="evaluate once before the first step: the baseline")
    timesteps: list[int] = Field([200, 400, 600, 800], min_length=1)
    stabilize_train: bool = Field(True, description="also log loss/train_stable on a fixed train subset")
    stabilize_split: float = Field(0.15, gt=0, le=1)
    early_stop_after: int | None = Field(None, ge=1, description="stop after K rising evaluations in a row")
    batch_size: int | None = Field(None, ge=1, description="default: training.batch_size")

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t <= 999]
        if bad:
            raise ValueError(f"timesteps must be in 0..999, got {bad[0]}")
        return v


# --- optimizer and schedule ---------------------------------------------------------------------


class OptimizerOverrides(Section):
    """Text-encoder overrides: a field left out (null) inherits the base value; 0 means 0."""

    name: str | None = None
    lr: float | None = Field(None, ge=0)
    betas: tuple[float, float] | None = None
    eps: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    d0: float | None = Field(None, gt=0)
    decouple: bool | None = None
    growth_rate: float | None = Field(None, gt=1)
    safeguard_warmup: bool | None = None
    use_bias_correction: bool | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None:
            optimizer_spec(v)  # raises naming the valid ones
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if v is not None and not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class OptimizerSection(OptimizerOverrides):
    name: str = "adamw"
    text_encoder: OptimizerOverrides = OptimizerOverrides()
    text_encoder_2: OptimizerOverrides = Field(
        OptimizerOverrides(), description="SDXL's second text encoder; unset fields inherit text_encoder's"
    )

    @model_validator(mode="after")
    def _applicable(self):
        # Explicitly set options must mean something to the optimizer that receives them. An
        # inherited base option that the text encoder's (different) optimizer lacks is just unused.
        spec = OPTIMIZERS[self.name]
        for option in OPTION_NAMES:
            if option in self.model_fields_set and getattr(self, option) is not None:
                if option not in spec.options:
                    raise ValueError(f"{option}: {self.name} has no {option} option")
        te_spec = OPTIMIZERS[self.text_encoder.name or self.name]
        for option in OPTION_NAMES:
            if getattr(self.text_encoder, option) is not None and option not in te_spec.options:
                raise ValueError(f"text_encoder.{option}: {te_spec.name} has no {option} option")
        te2_spec = OPTIMIZERS[self.text_encoder_2.name or self.text_encoder.name or self.name]
        for option in OPTION_NAMES:
            if getattr(self.text_encoder_2, option) is not None and option not in te2_spec.options:
                raise ValueError(f"text_encoder_2.{option}: {te2_spec.name} has no {option} option")
        return self

    def settings(self, component: str) -> OptimizerSettings:
        """The resolved optimizer settings of "unet" or "text_encoder" (the only place overrides
        are merged: an override is used whenever it is not None, so 0 stays 0)."""
        if component not in (*COMPONENTS, "text_encoder_2"):
            raise ValueError(f"unknown component {component!r}")
        # the text encoder's overrides, then (SDXL's TE2) its own on top of those
        chain = {"unet": (), "text_encoder": (self.text_encoder,),
                 "text_encoder_2": (self.text_encoder_2, self.text_encoder)}[component]  # fmt: skip
        name = next((o.name for o in chain if o.name is not None), self.name)
        spec = OPTIMIZERS[name]

        def pick(field: str):
            for source in (*chain, self):
                value = getattr(source, field)
                if value is not None:
                    return value
            return spec.defaults.get(field)

        options = {o: pick(o) for o in spec.options if pick(o) is not None}
        return OptimizerSettings(name=name, lr=float(pick("lr")), options=options)


class ScheduleFields(Section):
    name: ScheduleName = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a share of the run's steps (kohya %)")
    decay_steps: int | None = Field(None, ge=1, description="steps the decay spans (default: the whole run)")
    decay_run_multiple: float | None = Field(
        None,
        gt=0,
        description="instead of decay_steps: decay over int(run's steps x this) (EveryDream2: 1.5)",
    )
    warmup_decay_divisor: int | None = Field(
        None, ge=1, description="instead of warmup_steps: warm up over decay steps // this (EveryDream2: 50)"
    )
    num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: number of hard restarts")
    power: float = Field(1.0, gt=0, description="polynomial: power of the decay")
    end_ratio: float = Field(0.0, ge=0, lt=1, description="polynomial: final lr as a share of lr")
    half_cycle_steps: int | None = Field(None, ge=1, description="triangular: Smith's step size")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="triangular: lower bound as a share of lr")

    @model_validator(mode="after")
    def _applicable(self):
        warm = ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
        unused = f"not used by the {self.name} schedule"
        _only_when(self, ("warmup_steps", "warmup_ratio", "warmup_decay_divisor"), self.name in warm, unused)
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_ratio: set warmup_steps or warmup_ratio, not both")
        if self.warmup_ratio and self.warmup_decay_divisor is not None:
            raise ValueError("warmup_decay_divisor: set warmup_ratio or warmup_decay_divisor, not both")
        decays = ("linear", "cosine", "cosine_with_restarts", "polynomial", "linear_ramp")
        uses_decay = self.name in decays or self.warmup_decay_divisor is not None
        _only_when(
            self, ("decay_steps", "decay_run_multiple"), uses_decay, f"not used by the {self.name} schedule"
        )
        if self.decay_steps is not None and self.decay_run_multiple is not None:
            raise ValueError("decay_run_multiple: set decay_steps or decay_run_multiple, not both")
        if self.warmup_steps and self.warmup_decay_divisor is not None:
            raise ValueError("warmup_decay_divisor: set warmup_steps or warmup_decay_divisor, not both")
        _only_when(
            self, ("num_cycles",), self.name == "cosine_with_restarts", "only used by cosine_with_restarts"
        )
        _only_when(self, ("power", "end_ratio"), self.name == "polynomial", "only used by polynomial")
        cyclic = self.name in ("triangular", "triangular2")
        _only_when(self, ("half_cycle_steps", "min_lr_ratio"), cyclic, "only used by triangular/triangular2")
        if cyclic and self.half_cycle_steps is None:
            raise ValueError(f"half_cycle_steps: required by the {self.name} schedule")
        return self

    def decay_for(self, total_steps: int) -> int:
        """The steps the decay spans in a run of `total_steps` optimizer steps."""
        if self.decay_steps is not None:
            return self.decay_steps
        if self.decay_run_multiple is not None:
            return max(1, int(total_steps * self.decay_run_multiple))
        return max(1, total_steps)

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_decay_divisor is not None:
            return self.decay_for(total_steps) // self.warmup_decay_divisor
        return self.warmup_steps or round(self.warmup_ratio * total_steps)


class ScheduleSection(ScheduleFields):
    text_encoder: ScheduleFields | None = Field(
        None, description="the text encoder's own schedule (every field); null: the same as the UNet's"
    )

    text_encoder_2: ScheduleFields | None = Field(
        None, description="SDXL's second text encoder's own schedule; null: the same as text_encoder's"
    )

    def for_component(self, component: str) -> ScheduleFields:
        """The schedule of "unet", "text_encoder" or "text_encoder_2" (SDXL: null inherits TE1's)."""
        if component == "text_encoder_2" and self.text_encoder_2 is not None:
            return self.text_encoder_2
        if component in ("text_encoder", "text_encoder_2") and self.text_encoder is not None:
            return self.text_encoder
        return self


# --- what trains, and how -----------------------------------------------------------------------


class TextEncoderSection(Section):
    train: bool = True
    unfreeze_last_n_layers: int | None = Field(None, ge=0, description="null: all layers train")
    freeze_first_n_layers: int | None = Field(
        None, ge=0, description="instead of unfreeze_last_n_layers: freeze the first N layers"
    )
    freeze_embeddings: bool | Literal["auto"] = Field(
        False, description="auto: frozen when some layer is frozen (EveryDream2's rule)"
    )
    freeze_final_layer_norm: bool = False
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the text encoder's own gradient norm")

    @model_validator(mode="after")
    def _one_way(self):
        if self.unfreeze_last_n_layers is not None and self.freeze_first_n_layers is not None:
            raise ValueError("freeze_first_n_layers: set it or unfreeze_last_n_layers, not both")
        return self


class TextEncoder2Section(Section):
    """SDXL's second text encoder (OpenCLIP-bigG); a field left out (null) inherits text_encoder's."""

    train: bool | None = None
    unfreeze_last_n_layers: int | None = Field(None, ge=0)
    freeze_first_n_layers: int | None = Field(None, ge=0)
    freeze_embeddings: bool | Literal["auto"] | None = None
    freeze_final_layer_norm: bool | None = None
    clip_grad_norm: float | None = Field(None, gt=0, description="TE2's own gradient norm (null: TE1's)")

    @model_validator(mode="after")
    def _one_way(self):
        if self.unfreeze_last_n_layers is not None and self.freeze_first_n_layers is not None:
            raise ValueError("freeze_first_n_layers: set it or unfreeze_last_n_layers, not both")
        return self

    def resolved(self, te1: TextEncoderSection) -> TextEncoderSection:
        fields = {k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None}
        # the layer count is set one way or the other: TE2's choice replaces TE1's, not adds to it
        if self.unfreeze_last_n_layers is not None:
            fields["freeze_first_n_layers"] = None
        if self.freeze_first_n_layers is not None:
            fields["unfreeze_last_n_layers"] = None
        return te1.model_copy(update=fields)


class UnetSection(Section):
    train: bool = True
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the UNet's own gradient norm")


class NetworkSection(Section):
    """Train a LoRA (kohya's LoRA/LoCon) on a frozen base instead of fine-tuning it (train/network.py)."""

    type: Literal["lora", "locon"] = "lora"
    dim: int = Field(32, description="rank of every adapted Linear / 1x1 conv")
    alpha: float | None = Field(None, description="scale alpha/dim; default: equal to dim (seed 002's rule)")
    conv_dim: int | None = Field(None, description="locon: rank of the 3x3 convs (default: dim)")
    conv_alpha: float | None = Field(None, description="locon: default equal to conv_dim")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the rank-space activation (kohya's)")
    targets: Literal["default"] | list[str] = Field(
        "default", description="kohya's module set for the family, or regexes over diffusers module paths"
    )
    train: list[Literal["unet", "text_encoder"]] = Field(
        ["unet", "text_encoder"], min_length=1, description="text_encoder covers both of SDXL's"
    )
    init_seed: int | None = Field(None, description="seed of the initial LoRA weights (null: training.seed)")

    @model_validator(mode="after")
    def _valid(self):
        if self.dim < 1:
            raise ValueError(f"dim: must be at least 1, got {self.dim}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha: must be above 0, got {self.alpha}")
        if self.conv_alpha is not None and not self.conv_alpha > 0:
            raise ValueError(f"conv_alpha: must be above 0, got {self.conv_alpha}")
        if self.conv_dim is not None and self.conv_dim < 1:
            raise ValueError(f"conv_dim: must be at least 1, got {self.conv_dim}")
        _only_when(self, ("conv_dim", "conv_alpha"), self.type == "locon", "only used with type: locon")
        if isinstance(self.targets, list):
            if not self.targets:
                raise ValueError("targets: an empty list adapts nothing; use default or give patterns")
            for i, pattern in enumerate(self.targets):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"targets.{i}: {pattern!r} is not a valid regex ({e})") from None
        return self

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.dim)

    @property
    def resolved_conv_dim(self) -> int:
        return self.conv_dim if self.conv_dim is not None else self.dim

    @property
    def resolved_conv_alpha(self) -> float:
        return float(self.conv_alpha if self.conv_alpha is not None else self.resolved_conv_dim)


class TrainingSection(Section):
    max_epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (not micro-batches)")
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 555
    clip_grad_norm: float | None = Field(None, gt=0, description="one norm over everything trained")
    loss: Literal["mse", "huber", "mse_huber", "huber_mse", "pseudo_huber", "smooth_l1"] = Field(
        "mse",
        description="huber: Huber (delta 1); mse_huber: MSE x t/1000 + Huber x (1 - t/1000), as EveryDream2; "
        "pseudo_huber / smooth_l1: kohya's huber / smooth_l1 with huber_c",
    )
    huber_c: float = Field(0.1, gt=0, description="pseudo_huber / smooth_l1 (kohya's): the threshold c")
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr", description="pseudo_huber / smooth_l1: how c varies with the timestep (kohya's)"
    )
    huber_scale: float = Field(1.0, gt=0, description="pseudo_huber / smooth_l1: exponential/constant scale")
    clip_skip: int = Field(
        1, ge=0, le=12, description="A1111 units: 1 (or 0) the last layer, 2 the penultimate"
    )
    zero_frequency_noise_ratio: float = Field(0.0, ge=0, description="offset noise added per channel")
    min_snr_gamma: float | None = Field(None, gt=0)
    timestep_min: int = Field(0, ge=0, le=999)
    timestep_max: int = Field(999, ge=0, le=999)
    device: Literal["auto", "cpu"] = Field("auto", description="cpu forces the CPU even with a GPU")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the trained weights")
    ema_strength_target: float | None = Field(
        None, gt=0, lt=1, description="instead of ema_decay: target ** (ema_every_n_steps / total steps)"
    )
    ema_every_n_steps: int = Field(1, ge=1, description="optimizer steps between EMA updates")
    ema_device: Literal["auto", "cpu"] = Field("auto", description="cpu keeps the EMA off the GPU")
    ema_warmup: bool = Field(True, description="ramp the EMA decay in: min(decay, (1 + t) / (10 + t))")

    @model_validator(mode="after")
    def _length(self):
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("max_steps: set training.max_epochs or training.max_steps (or both)")
        if self.ema_decay is not None and self.ema_strength_target is not None:
            raise ValueError("ema_strength_target: set ema_decay or ema_strength_target, not both")
        kohya = self.loss in ("pseudo_huber", "smooth_l1")
        huber = ("huber_c", "huber_schedule", "huber_scale")
        _only_when(self, huber, kohya, "only used by pseudo_huber/smooth_l1")
        if self.timestep_min > self.timestep_max:
            raise ValueError(f"timestep_min: {self.timestep_min} is above timestep_max {self.timestep_max}")
        return self


class SavingSection(Section):
    name: str | None = Field(None, description="checkpoint name (default: the run folder's name)")
    every_n_epochs: int | None = Field(1, ge=1)
    every_n_steps: int | None = Field(None, ge=1)
    every_n_minutes: float | None = Field(None, gt=0)
    keep_last: int | None = Field(None, ge=1)
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    format: list[Literal["single_file", "diffusers"]] = Field(
        ["single_file"],
        min_length=1,
        description="single_file (.safetensors, what A1111/ComfyUI load) and/or diffusers (a folder)",
    )
    ema: Literal["both", "ema", "model"] = Field(
        "both", description="with training.ema_decay: save the EMA weights (-ema file), the model's, or both"
    )
    state: Literal["checkpoints", "interrupt", "never"] = Field(
        "checkpoints",
        description="when RUNDIR/state/ (what --resume needs) is written: with every checkpoint and on "
        "Ctrl-C, on Ctrl-C only, or never; only the latest is kept, and it is removed when the run ends",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", v):
            raise ValueError(f"name {v!r}: use letters, digits and _ . + - only (it names files)")
        return v


class SamplingSection(Section):
    prompts: list[str] = []
    every_n_steps: int | None = Field(None, ge=1)
    every_n_epochs: int | None = Field(None, ge=1)
    at_end: bool = True
    seeds: list[int] = Field([555], min_length=1)
    cfg: float = Field(7.0, ge=0)
    steps: int = Field(20, ge=1)
    size: int | None = Field(None, ge=8, description="default: data.resolution")


class LoggingSection(Section):
    every_n_steps: int = Field(1, ge=1, description="how often loss/train and lr are written")
    tensorboard: bool = True


class Recipe(Section):
    model: ModelSection
    data: DataSection
    validation: ValidationSection = ValidationSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    text_encoder: TextEncoderSection = TextEncoderSection()
    text_encoder_2: TextEncoder2Section = TextEncoder2Section()
    unet: UnetSection = UnetSection()
    network: NetworkSection | None = None  # absent: a full fine-tune
    training: TrainingSection
    saving: SavingSection = SavingSection()
    sampling: SamplingSection = SamplingSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _something_trains(self):
        if not self.trains("unet") and not self.trains("text_encoder"):
            raise ValueError(
                "unet.train: nothing would train (the UNet and the text encoder are both off or at lr 0)"
            )
        return self

    def trains(self, component: str) -> bool:
        """Whether a component gets an optimizer: switched on and a non-zero lr."""
        if component == "text_encoder_2":
            on = self.text_encoder_section(component).train
        else:
            on = self.unet.train if component == "unet" else self.text_encoder.train
        if self.network is not None:  # a LoRA trains only on the components its section lists
            on = on and ("unet" if component == "unet" else "text_encoder") in self.network.train
        return on and self.optimizer.settings(component).lr > 0

    def text_encoder_section(self, component: str) -> TextEncoderSection:
        """The freezing settings of "text_encoder" or "text_encoder_2" (SDXL), inheritance resolved."""
        if component == "text_encoder_2":
            return self.text_encoder_2.resolved(self.text_encoder)
        return self.text_encoder

    def sets_text_encoder_2(self) -> bool:
        """Whether the recipe says anything about a second text encoder (only SDXL has one)."""
        sections = (self.text_encoder_2, self.optimizer.text_encoder_2)
        return self.schedule.text_encoder_2 is not None or any(
            getattr(s, k) is not None for s in sections for k in type(s).model_fields
        )

    def clip_grad_norm_of(self, component: str) -> float | None:
        """The component's own clip_grad_norm (unet, text_encoder, or text_encoder_2 inheriting TE1's)."""
        if component == "unet":
            return self.unet.clip_grad_norm
        return self.text_encoder_section(component).clip_grad_norm

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_yaml(self, only_set: bool = False) -> str:
        return dump_yaml(self.model_dump(mode="json", exclude_unset=only_set))


SECTION_ORDER = tuple(Recipe.model_fields)


class _Dumper(yaml.SafeDumper):
    pass


def _list_flow(dumper: yaml.SafeDumper, data: list):
    # [0.9, 0.999] reads better inline; lists of long strings (prompts) stay one per line.
    flow = all(isinstance(v, (int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _list_flow)


def dump_yaml(data: dict) -> str:
    """A recipe dict as block-style YAML, sections in the schema's order."""
    ordered = {k: data[k] for k in SECTION_ORDER if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    return yaml.dump(
        ordered, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True
    )


# --- loading ------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `--set a.b=value` overrides, validate. Errors name file and field."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{path}: no such recipe file")
    data = load_yaml_file(path, "")  # regular file, bounded size, UTF-8, plain values, bounded aliases
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: a recipe is a YAML mapping of sections, not a {type(data).__name__}")
    return parse_recipe(data, str(path), overrides)


def parse_recipe(data: dict, source: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data = json.loads(json.dumps(data))  # a deep copy that also refuses non-plain values early
    set_keys = []
    for item in overrides:
        set_keys.append(apply_override(data, item))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise WorkbenchError(f"{source}: {describe_errors(e, set_keys)}") from None


def apply_override(data: dict, item: str) -> str:
    """Apply one `a.b.c=value` to a raw recipe dict; the value is YAML (40 -> int, 1e-6 -> float,
    [0.9, 0.99] -> list, null -> None). Returns the dotted key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise WorkbenchError(f"--set {item}: expected section.field=value, e.g. training.max_steps=40")
    try:
        value = parse_yaml(raw, f"--set {item}") if raw.strip() else ""
    except WorkbenchError as e:
        why = str(e).split(": ", 1)[-1]
        raise WorkbenchError(f"--set {item}: the value is not valid YAML ({why})") from None
    value = _yaml11_float(value)
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise WorkbenchError(f"--set {item}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return key


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _yaml11_float(value: Any) -> Any:
    # PyYAML follows YAML 1.1, where "1e-6" (no dot) is a string; everyone means a number.
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def describe_errors(e: ValidationError, set_keys: list[str] = ()) -> str:
    """pydantic's errors as `field.path: message` parts joined by '; ' (one line)."""
    parts = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        # Validators name the field they refuse as "field: why": fold it into the path.
        named = re.match(r"^([a-z_][a-z0-9_.]*): (.*)$", msg)
        if err["type"] == "value_error" and named:
            loc, msg = [*loc, *named.group(1).split(".")], named.group(2)
        elif err["type"] == "extra_forbidden":
            msg = "unknown field" + _did_you_mean(loc)
        elif err["type"] == "missing":
            msg = "required field missing"
        else:
            msg = msg[:1].lower() + msg[1:]
            if err["type"] != "value_error" and "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {_short(err['input'])})"
        path = ".".join(loc)
        via = next(
            (k for k in set_keys if path == k or path.startswith(k + ".") or k.startswith(path + ".")), None
        )
        parts.append(f"{path}: {msg}" + (f" (from --set {via})" if via else ""))
    return "; ".join(dict.fromkeys(parts))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(loc: list[str]) -> str:
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
