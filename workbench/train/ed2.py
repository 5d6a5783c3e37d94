"""Import an EveryDream2 configuration (train.json + optimizer json + validation json) as a recipe.

The rule: the recipe trains what EveryDream2 (ED2) would train from these files, number for number
(ED2's code, May 2025; the flat optimizer json as ED2 of 2023-03..05 ran it). Where wb cannot, a
warning names the field and says what wb does instead. docs/train.md has the table, field by field.

Every key of every file ends up in exactly one list of the result: `mapped` (into which recipe
field), `unsupported` (it changes training and wb cannot do it: a warning), or `ignored` (no effect
on the weights: a GPU index, a log folder, a feature switched off). `notes` say where ED2 does
something its config does not say (precedence, micro-batch counting, ...).

ED2 copies train.json over its argparse defaults, so a key left out takes ED2's default (max_epochs
300, batch_size 2, cond_dropout 0.04, zero_frequency_noise_ratio 0.02, loss_type mse_huber, ...). A
null stays null in ED2; where ED2's code has a meaning for null (lr, schedule lengths, saving, noise
ratio, loss_type), that meaning is imported, elsewhere (where ED2 would crash) the default.
The optimizer and validation files are looked up beside train.json, then in the working folder (ED2
reads them from its working folder); optimizer_config defaults to optimizer.json, as in ED2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.train import ed2_optimizer as eo
from workbench.train.ed2_buckets import ED2_BUCKETS
from workbench.train.ed2_validation import import_validation
from workbench.train.recipe import dump_yaml, parse_recipe

# ED2's argparse defaults (train.py) for the keys that change training.
DEFAULTS = {
    "batch_size": 2, "max_epochs": 300, "cond_dropout": 0.04, "zero_frequency_noise_ratio": 0.02,
    "loss_type": "mse_huber", "flip_p": 0.0, "resolution": 512, "seed": 555, "grad_accum": 1,
    "gradient_checkpointing": False, "timestep_start": 0, "timestep_end": 1000, "log_step": 25,
    "sample_steps": 250, "clip_skip": 0, "ema_update_interval": 500, "ema_device": "cpu",
    "data_root": "input", "resume_ckpt": "sd_v1-5_vae.ckpt", "shuffle_tags": False,
}  # fmt: skip
# ED2's shipped optimizer.json (what runs when train.json names none and none is beside it).
SHIPPED_OPTIMIZER = {
    "base": {"optimizer": "adamw8bit", "lr": 1e-6, "lr_scheduler": "constant", "lr_decay_steps": None,
             "lr_warmup_steps": None, "betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.010},
    "text_encoder_overrides": {"optimizer": None, "lr": 5e-7, "lr_scheduler": "cosine",
                               "lr_decay_steps": None,
                               "lr_warmup_steps": None, "betas": None, "epsilon": None, "weight_decay": None},
    "text_encoder_freezing": {"unfreeze_last_n_layers": None},
}  # fmt: skip

# Keys with no effect on the weights whatever their value: where files go, UI and logging switches.
NO_EFFECT = {
    "config", "notebook", "logdir", "save_ckpt_dir", "run_name", "disable_xformers", "useadam8bit",
    "write_schedule", "gpuid", "attn_type", "log_grad_norm", "apply_grad_scaler_step_tweaks", "doc",
    "documentation", "lowvram", "wandb", "save_optimizer", "no_prepend_last", "no_save_ckpt", "ed1_mode",
    "use_relative_loss", "scale_lr", "ema_sample_nonema_model", "ema_sample_ema_model", "amp",
}  # fmt: skip
INT, FLOAT, BOOL, STR = (int,), (int, float), (bool,), (str,)
TYPES = {
    "batch_size": INT, "grad_accum": INT, "max_epochs": INT, "log_step": INT, "timestep_start": INT,
    "timestep_end": INT, "lr_warmup_steps": INT, "lr_decay_steps": INT, "save_every_n_epochs": INT,
    "ckpt_every_n_minutes": FLOAT, "sample_steps": INT, "seed": INT, "clip_skip": INT, "resolution": INT,
    "ema_update_interval": INT, "save_ckpts_from_n_epochs": INT, "keep_tags": INT, "gpuid": INT,
    "lr": FLOAT, "cond_dropout": FLOAT, "flip_p": FLOAT, "zero_frequency_noise_ratio": FLOAT,
    "clip_grad_norm": FLOAT, "min_snr_gamma": FLOAT, "ema_decay_rate": FLOAT, "ema_strength_target": FLOAT,
    "embedding_perturbation": FLOAT, "pyramid_noise_discount": FLOAT,
    "disable_amp": BOOL, "disable_textenc_training": BOOL, "disable_unet_training": BOOL,
    "gradient_checkpointing": BOOL, "shuffle_tags": BOOL, "save_full_precision": BOOL, "rated_dataset": BOOL,
    "enable_zero_terminal_snr": BOOL, "load_settings_every_epoch": BOOL,
    "data_root": STR, "resume_ckpt": STR, "project_name": STR, "lr_scheduler": STR, "loss_type": STR,
    "optimizer_config": STR, "validation_config": STR, "sample_prompts": STR, "ema_device": STR,
    # optimizer json sections
    "optimizer": STR, "epsilon": FLOAT, "weight_decay": FLOAT, "d0": FLOAT, "momentum": FLOAT,
    "growth_rate": FLOAT, "decouple": BOOL, "safeguard_warmup": BOOL, "text_encoder_lr_scale": FLOAT,
    "unfreeze_last_n_layers": INT, "freeze_front_n_layers": INT, "freeze_embeddings": BOOL,
    "freeze_final_layer_norm": BOOL, "unfreeze_final_n_layers": INT,
    # validation json
    "val_split_mode": STR, "auto_split_proportion": FLOAT, "val_split_proportion": FLOAT,
    "stabilize_split_proportion": FLOAT, "every_n_epochs": FLOAT, "manual_data_root": STR,
    "val_data_root": STR,
}  # fmt: skip
TYPE_NAMES = {INT: "an integer", FLOAT: "a number", BOOL: "true or false", STR: "a string"}
LOSSES = ("mse", "huber", "mse_huber", "huber_mse")


@dataclass
class Ed2Import:
    recipe: dict = field(default_factory=dict)  # a raw recipe, validated before import_ed2 returns
    mapped: list[str] = field(default_factory=list)  # "file:key -> recipe.field"
    unsupported: list[str] = field(default_factory=list)  # "file:key=value (what wb does)": a difference
    ignored: list[str] = field(default_factory=list)  # "file:key=value": no effect on the weights
    notes: list[str] = field(default_factory=list)  # what ED2 does that its config does not say
    sources: list[Path] = field(default_factory=list)
    schedules: dict[str, str] = field(default_factory=dict)  # component -> one line, for the CLI
    flat: bool = False  # the optimizer json is the flat format of ED2 2023-03..05

    def put(self, where: str, key: str, path: str, value: Any) -> None:
        self.set(path, value)
        self.mapped.append(f"{where}{key} -> {path}")

    def set(self, path: str, value: Any) -> None:
        node = self.recipe
        *sections, name = path.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.recipe
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def skip(self, where: str, key: str, value: Any, why: str = "", unsupported: bool = False) -> None:
        item = f"{where}{key}={json.dumps(value)}" + (f" ({why})" if why else "")
        (self.unsupported if unsupported else self.ignored).append(item)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a JSON object")
    return data


def _check_types(data: dict, path: Path, prefix: str = "") -> None:
    """Refuse a wrongly typed field with one line naming the file and the field."""
    for key, value in data.items():
        if isinstance(value, dict) and key in ("base", "text_encoder_overrides", "text_encoder_freezing"):
            _check_types(value, path, f"{prefix}{key}.")
            continue
        kind = TYPES.get(key)
        if value is None or kind is None:
            continue
        if key == "betas":
            continue
        ok = isinstance(value, kind) and not (kind != BOOL and isinstance(value, bool))
        if key == "validate_training":
            ok = True
        if not ok:
            raise WorkbenchError(
                f"{path}: {prefix}{key}: expected {TYPE_NAMES[kind]}, got {json.dumps(value)}"
            )
    betas = [s.get("betas") for s in (data, data.get("base") or {}, data.get("text_encoder_overrides") or {})
             if isinstance(s, dict)]  # fmt: skip
    for b in betas:
        if b is not None and not (
            isinstance(b, list) and len(b) == 2 and all(isinstance(x, (int, float)) for x in b)
        ):
            raise WorkbenchError(f"{path}: betas: expected two numbers, got {json.dumps(b)}")


def _find(train_json: Path, name: str, key: str, required: bool = True) -> Path | None:
    """ED2 resolves these from its working folder; users keep them beside train.json."""
    for candidate in (train_json.parent / name, Path(name)):
        if candidate.is_file():
            return candidate
    if required:
        raise WorkbenchError(f"{train_json}: {key} {name!r} not found beside it ({train_json.parent / name})")
    return None


def import_ed2(train_json: str | os.PathLike) -> Ed2Import:
    """Read train.json and the files it names; return the recipe and an account of every key."""
    train_json = Path(train_json)
    cfg = _read_json(train_json, "EveryDream2 train.json")
    _check_types(cfg, train_json)
    result = Ed2Import(sources=[train_json])
    where = f"{train_json.name}:"
    ga = cfg.get("grad_accum") or 1
    if ga < 1:
        raise WorkbenchError(f"{train_json}: grad_accum: must be at least 1, got {ga}")
    opt, opt_where = _optimizer_file(cfg, train_json, result, where)
    _import_optimizer(opt, cfg, result, opt_where, ga)
    if cfg.get("validation_config"):
        path = _find(train_json, cfg["validation_config"], "validation_config")
        val = _read_json(path, "validation config")
        _check_types(val, path)
        result.sources.append(path)
        result.mapped.append(f"{where}validation_config -> (read: {path.name})")
        import_validation(val, result, f"{path.name}:")
    else:
        result.set("validation.enabled", False)  # ED2 validates only with a validation json
        result.skip(where, "validation_config", cfg.get("validation_config"), "no validation, as in ED2")
    _import_train(cfg, train_json, result, where, ga)
    _finish(result)
    parse_recipe(result.recipe, f"{train_json} (imported)")  # fail here, naming the field, not later
    return result


def _optimizer_file(cfg: dict, train_json: Path, result: Ed2Import, where: str) -> tuple[dict, str]:
    name = cfg.get("optimizer_config") or "optimizer.json"
    path = _find(train_json, name, "optimizer_config", required=bool(cfg.get("optimizer_config")))
    if path is None:
        result.notes.append(
            f"optimizer_config: no {name} beside {train_json.name}: EveryDream2 reads the one in its "
            "own folder; "
            "imported as ED2's shipped optimizer.json (adamw8bit, lr 1e-6; text encoder 5e-7 on cosine)"
        )
        result.mapped.append(f"{where}optimizer_config -> (ED2's shipped optimizer.json)")
        return json.loads(json.dumps(SHIPPED_OPTIMIZER)), "optimizer.json (ED2's):"
    opt = _read_json(path, "optimizer config")
    _check_types(opt, path)
    result.sources.append(path)
    result.mapped.append(f"{where}optimizer_config -> (read: {path.name})")
    return opt, f"{path.name}:"


# --- the optimizer json -----------------------------------------------------------------------------


def _import_optimizer(opt: dict, cfg: dict, result: Ed2Import, where: str, ga: int) -> None:
    flat = result.flat = eo.is_flat(opt)
    resolved = eo.resolve_flat(opt, cfg, where) if flat else eo.resolve(opt, cfg, where)
    result.notes += resolved.notes
    result.unsupported += resolved.warnings
    unet, te = resolved.unet, resolved.text_encoder
    inf = float("inf")
    optimizer: dict[str, Any] = {"name": unet.optimizer, "lr": unet.lr, **unet.options}
    if optimizer.get("growth_rate") == inf:
        del optimizer["growth_rate"]  # the libraries' own default: no limit
    if te.options.get("growth_rate") == inf and "growth_rate" not in optimizer:
        del te.options["growth_rate"]
    over: dict[str, Any] = {}
    if te.optimizer != unet.optimizer:
        over["name"] = te.optimizer
    if te.lr != unet.lr:
        over["lr"] = te.lr
    for k, v in te.options.items():
        if optimizer.get(k) != v:
            over[k] = v
    if over:
        optimizer["text_encoder"] = over
    result.recipe["optimizer"] = optimizer
    schedule = eo.schedule_fields(unet, ga, result.notes, "unet")
    te_schedule = eo.schedule_fields(te, ga, result.notes, "text_encoder")
    if te_schedule != schedule:
        schedule["text_encoder"] = te_schedule
    result.recipe["schedule"] = schedule
    for label, c in (("unet", unet), ("text_encoder", te)):
        off = cfg.get(f"disable_{'textenc' if label == 'text_encoder' else 'unet'}_training")
        result.schedules[label] = "not trained" if off else _describe(c, ga)
    if cfg.get("lr") is not None and not flat:
        result.notes.append(
            f"train.json lr {cfg['lr']:g} replaces the lr of both the UNet and the text encoder (as in ED2)"
        )
    train_sched = {k: cfg.get(k) for k in ("lr_scheduler", "lr_warmup_steps", "lr_decay_steps") if cfg.get(k)}
    base = opt.get("base") or {}
    overruled = {k: v for k, v in train_sched.items() if not flat and base.get(k) and base.get(k) != v}
    if overruled:
        result.notes.append(
            "train.json "
            + ", ".join(f"{k} {v!r}" for k, v in overruled.items())
            + f": overruled by {where}base ("
            + ", ".join(f"{k} {base[k]!r}" for k in overruled)
            + "): in ED2 the optimizer json wins, train.json only fills its nulls"
        )
    for key, value in opt.items():
        if key in ("base", "text_encoder_overrides"):
            for k, v in (value or {}).items():
                sub = f"{where}{key}."
                if k in eo.SECTION_KEYS:
                    result.mapped.append(f"{sub}{k} -> optimizer/schedule (resolved as ED2 does)")
                else:
                    result.skip(sub, k, v, "EveryDream2 does not read it")
        elif key == "text_encoder_freezing":
            _freezing(value or {}, result, f"{where}text_encoder_freezing.")
        elif key == "text_encoder_lr_scale":
            if flat:
                result.mapped.append(f"{where}{key} -> optimizer.text_encoder.lr")
            else:
                result.skip(
                    where, key, value, "EveryDream2's code ignores it in this format, as does the import"
                )
        elif flat and key in ("optimizer", "lr", "betas", "epsilon", "weight_decay"):
            result.mapped.append(f"{where}{key} -> optimizer (as ED2 2023-03..05)")
        elif key in eo.SECTION_KEYS:
            result.skip(
                where, key, value, "outside base/text_encoder_overrides: EveryDream2 does not read it"
            )
        elif key in NO_EFFECT:
            result.skip(where, key, value)
        else:
            result.skip(where, key, value, "not an EveryDream2 optimizer setting")
    if flat:
        result.notes.append(
            f"{where} the flat format of EveryDream2 2023-03..05: one optimizer for both components, "
            "train.json's schedule for both"
        )


def _describe(c: eo.Component, ga: int) -> str:
    def steps(v):
        return "auto" if v == eo.AUTO else str(round(v / ga))

    text = f"{c.optimizer} lr {c.lr:g}, {c.scheduler}"
    if c.scheduler != "constant":
        warm = "decay/50" if c.warmup == eo.AUTO else steps(c.warmup)
        decay = "1.5x the run" if c.decay == eo.AUTO else steps(c.decay)
        text += f" (warmup {warm}, decay {decay} steps)"
    return text


def _freezing(src: dict, result: Ed2Import, where: str) -> None:
    """ED2's _apply_text_encoder_freeze: unfreeze_last_n_layers (wins over freeze_front_n_layers,
    even when null); a negative freeze_front_n_layers counts from the end; embeddings are frozen when
    fewer than all layers train unless freeze_embeddings says otherwise."""
    unfreeze = None
    if src.get("freeze_front_n_layers") is not None:
        front = src["freeze_front_n_layers"]
        if front < 0:
            unfreeze = -front
        else:
            result.put(where, "freeze_front_n_layers", "text_encoder.freeze_first_n_layers", front)
    elif "freeze_front_n_layers" in src:
        result.skip(where, "freeze_front_n_layers", None)
    if "unfreeze_last_n_layers" in src:
        unfreeze = src["unfreeze_last_n_layers"]
        if unfreeze is not None and unfreeze < 1:
            raise WorkbenchError(
                f"{where}unfreeze_last_n_layers: {unfreeze}: EveryDream2 requires at least 1"
            )
        if unfreeze is None and result.get("text_encoder.freeze_first_n_layers") is not None:
            result.recipe["text_encoder"].pop("freeze_first_n_layers")
            result.notes.append(
                f"{where}unfreeze_last_n_layers null overrules freeze_front_n_layers (as in ED2)"
            )
    if unfreeze is not None:
        key = "unfreeze_last_n_layers" if "unfreeze_last_n_layers" in src else "freeze_front_n_layers"
        result.put(where, key, "text_encoder.unfreeze_last_n_layers", unfreeze)
    elif "unfreeze_last_n_layers" in src:
        result.skip(where, "unfreeze_last_n_layers", None, "all layers train")
    if "freeze_embeddings" in src:
        result.put(
            where, "freeze_embeddings", "text_encoder.freeze_embeddings", bool(src["freeze_embeddings"])
        )
    elif unfreeze is not None or result.get("text_encoder.freeze_first_n_layers"):
        result.set("text_encoder.freeze_embeddings", "auto")
    if "freeze_final_layer_norm" in src:
        value = bool(src["freeze_final_layer_norm"])
        result.put(where, "freeze_final_layer_norm", "text_encoder.freeze_final_layer_norm", value)
    for key, value in src.items():
        if key == "unfreeze_final_n_layers":
            result.skip(where, key, value)
            result.notes.append(
                f"{where}unfreeze_final_n_layers={value}: a key of ED2's docs that its code ignores; "
                "imported as ED2 runs it (this key freezes nothing)"
            )
        elif key not in ("freeze_front_n_layers", "unfreeze_last_n_layers", "freeze_embeddings",
                         "freeze_final_layer_norm"):  # fmt: skip
            result.skip(where, key, value, "EveryDream2 does not read it")


# --- train.json ---------------------------------------------------------------------------------------


def _value(cfg: dict, key: str) -> Any:
    """ED2's value of a key: the JSON's, else (left out, or null where ED2 would crash) the default."""
    value = cfg.get(key)
    return DEFAULTS.get(key) if value is None else value


def _import_train(cfg: dict, train_json: Path, result: Ed2Import, where: str, ga: int) -> None:
    handled = {
        "optimizer_config",
        "validation_config",
        "lr",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_decay_steps",
    }
    for key in ("lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps"):
        if key in cfg:
            result.mapped.append(f"{where}{key} -> optimizer/schedule (resolved as ED2 does)")
    put = result.put
    # What always has a value in ED2 (the JSON's or the default).
    for key, path in (("batch_size", "training.batch_size"), ("max_epochs", "training.max_epochs"),
                      ("grad_accum", "training.grad_accum"), ("resolution", "data.resolution"),
                      ("flip_p", "data.flip_p"), ("cond_dropout", "data.cond_dropout"),
                      ("gradient_checkpointing", "training.gradient_checkpointing"),
                      ("timestep_start", "training.timestep_min"), ("shuffle_tags", "data.shuffle_tags"),
                      ("data_root", "data.root"), ("resume_ckpt", "model.base")):  # fmt: skip
        put(where if key in cfg else "(ED2 default) ", key, path, _value(cfg, key))
        handled.add(key)
    put(
        where if "timestep_end" in cfg else "(ED2 default) ",
        "timestep_end",
        "training.timestep_max",
        _value(cfg, "timestep_end") - 1,
    )  # ED2's randint: the end is exclusive
    zfn = cfg.get("zero_frequency_noise_ratio", DEFAULTS["zero_frequency_noise_ratio"])
    put(
        where if "zero_frequency_noise_ratio" in cfg else "(ED2 default) ",
        "zero_frequency_noise_ratio",
        "training.zero_frequency_noise_ratio",
        max(0.0, zfn or 0.0),
    )
    loss = cfg["loss_type"] if "loss_type" in cfg else DEFAULTS["loss_type"]
    if result.flat and "loss_type" not in cfg:
        loss = "mse"  # ED2 of the flat optimizer json had only MSE
    if loss not in LOSSES:
        result.unsupported.append(
            f"{where}loss_type={json.dumps(loss)} (ED2 falls back to mse for it; so does wb)"
        )
        loss = "mse"
    put(where if "loss_type" in cfg else "(ED2 default) ", "loss_type", "training.loss", loss)
    handled |= {"timestep_end", "zero_frequency_noise_ratio", "loss_type", "grad_accum"}
    if str(_value(cfg, "resume_ckpt")) and not re.search(
        r"\.(safetensors|ckpt|pt|pth|bin)$", str(_value(cfg, "resume_ckpt"))
    ):
        result.notes.append(
            f"model.base {_value(cfg, 'resume_ckpt')!r} is an EveryDream2 model name: point it at the "
            "checkpoint "
            "file (e.g. models/sd15.safetensors)"
        )
    if "\\" in str(_value(cfg, "data_root")):
        result.notes.append(
            f"data.root {_value(cfg, 'data_root')!r} is a Windows path: point it at the images here"
        )
    if result.get("data.shuffle_tags"):
        result.notes.append("shuffle_tags: wb keeps the first tag in place and shuffles the rest")
    seed = _value(cfg, "seed")
    if seed == -1:
        result.skip(
            where, "seed", seed, "a random seed in ED2; wb needs a fixed one: using 555", unsupported=True
        )
    else:
        put(where if "seed" in cfg else "(ED2 default) ", "seed", "training.seed", seed)
    handled.add("seed")
    _saving(cfg, result, where, handled)
    _misc(cfg, train_json, result, where, ga, handled)
    for key, value in cfg.items():
        if key in handled:
            continue
        if key in NO_EFFECT:
            result.skip(where, key, value)
        elif key.startswith("rated_dataset_") and not cfg.get("rated_dataset"):
            result.skip(where, key, value, "rated_dataset is off")
        elif value is None or value is False or value == 0 or value == "" or value == {}:
            result.skip(where, key, value, "off")
        else:
            result.skip(where, key, value, "wb has no equivalent: trains without it", unsupported=True)
    # ED2 trains every image in a bucket of its aspect-ratio table for the resolution
    result.set("data.aspect_buckets", True)
    resolution = result.get("data.resolution")
    if int(resolution / 64) * 64 in ED2_BUCKETS:
        result.set("data.bucket_set", "ed2")
    else:
        result.unsupported.append(
            f"{where}resolution={resolution} (EveryDream2 refuses it: no buckets; "
            "wb trains it in its own buckets)"
        )
        if resolution % 64:
            result.set("data.bucket_step", 8 if resolution % 8 == 0 else resolution)


def _saving(cfg: dict, result: Ed2Import, where: str, handled: set) -> None:
    minutes, epochs = cfg.get("ckpt_every_n_minutes"), cfg.get("save_every_n_epochs")
    handled |= {"ckpt_every_n_minutes", "save_every_n_epochs", "project_name", "save_full_precision"}
    if minutes is None and epochs is None:
        minutes = 20
        result.notes.append(
            "saving: neither ckpt_every_n_minutes nor save_every_n_epochs: every 20 minutes, as ED2"
        )
    result.set("saving.every_n_minutes", minutes if minutes is not None and minutes >= 1 else None)
    result.set("saving.every_n_epochs", epochs if epochs is not None and epochs >= 1 else None)
    for key in ("ckpt_every_n_minutes", "save_every_n_epochs"):
        if key in cfg:
            result.mapped.append(
                f"{where}{key} -> saving.{'every_n_minutes' if 'min' in key else 'every_n_epochs'}"
            )
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(cfg.get("project_name") or "")).strip("_.")
    if name:
        result.put(where, "project_name", "saving.name", name)
    elif "project_name" in cfg:
        result.skip(where, "project_name", cfg["project_name"])
    if "save_full_precision" in cfg:
        if cfg["save_full_precision"]:
            result.put(where, "save_full_precision", "saving.dtype", "fp32")
        else:
            result.skip(where, "save_full_precision", False, "fp16 is the default")


def _misc(cfg: dict, train_json: Path, result: Ed2Import, where: str, ga: int, handled: set) -> None:
    put = result.put
    handled |= {"clip_grad_norm", "min_snr_gamma", "clip_skip", "disable_amp", "disable_textenc_training",
                "disable_unet_training", "log_step", "sample_prompts", "sample_steps", "ema_decay_rate",
                "ema_strength_target", "ema_update_interval", "ema_device", "ema_resume_model"}  # fmt: skip
    if cfg.get("clip_grad_norm") is not None:
        put(where, "clip_grad_norm", "unet.clip_grad_norm", cfg["clip_grad_norm"])
        if result.flat:
            put(where, "clip_grad_norm", "text_encoder.clip_grad_norm", cfg["clip_grad_norm"])
        else:
            result.notes.append(
                "clip_grad_norm: ED2 clips the UNet's gradient norm alone; its text-encoder clip gets an "
                "already used-up parameter list and clips nothing, so the import clips only the UNet"
            )
    elif "clip_grad_norm" in cfg:
        result.skip(where, "clip_grad_norm", None, "off")
    if cfg.get("min_snr_gamma") is not None:
        put(where, "min_snr_gamma", "training.min_snr_gamma", cfg["min_snr_gamma"])
    elif "min_snr_gamma" in cfg:
        result.skip(where, "min_snr_gamma", None, "off")
    skip = max(0, min(4, _value(cfg, "clip_skip")))  # ED2 clamps to 0..4; 0 and 1 are the last layer
    if "clip_skip" in cfg:
        put(where, "clip_skip", "training.clip_skip", max(1, skip))
    if cfg.get("disable_amp"):
        put(where, "disable_amp", "training.mixed_precision", "no")
    elif "disable_amp" in cfg:
        result.skip(where, "disable_amp", cfg["disable_amp"], "mixed precision is on by default on GPUs")
    for key, path in (
        ("disable_textenc_training", "text_encoder.train"),
        ("disable_unet_training", "unet.train"),
    ):
        if cfg.get(key):
            put(where, key, path, False)
        elif key in cfg:
            result.skip(where, key, cfg[key], "trains, as by default")
    log = max(1, round(_value(cfg, "log_step") / ga))
    put(where if "log_step" in cfg else "(ED2 default) ", "log_step", "logging.every_n_steps", log)
    _import_prompts(cfg.get("sample_prompts"), train_json, result, where)
    if result.get("sampling.prompts"):
        put(where, "sample_steps", "sampling.every_n_steps", max(1, round(_value(cfg, "sample_steps") / ga)))
    elif "sample_steps" in cfg:
        result.skip(where, "sample_steps", cfg["sample_steps"], "no sample prompts were imported")
    _ema(cfg, result, where, ga)


def _ema(cfg: dict, result: Ed2Import, where: str, ga: int) -> None:
    rate, target = cfg.get("ema_decay_rate"), cfg.get("ema_strength_target")
    keys = ("ema_decay_rate", "ema_strength_target", "ema_update_interval", "ema_device", "ema_resume_model")
    if rate is None and target is None:
        for key in keys:
            if key in cfg:
                result.skip(where, key, cfg[key], "EMA is off")
        return
    if target is not None:
        result.put(where, "ema_strength_target", "training.ema_strength_target", target)
        if rate is not None:
            result.skip(where, "ema_decay_rate", rate, "ema_strength_target overrules it, as in ED2")
    else:
        result.put(where, "ema_decay_rate", "training.ema_decay", rate)
    interval = _value(cfg, "ema_update_interval")
    result.put(
        where if "ema_update_interval" in cfg else "(ED2 default) ",
        "ema_update_interval",
        "training.ema_every_n_steps",
        interval,
    )  # ED2 multiplies it by grad_accum: optimizer steps
    result.set("training.ema_warmup", False)  # ED2 averages from the first update at the full decay
    device = _value(cfg, "ema_device")
    result.put(
        where if "ema_device" in cfg else "(ED2 default) ",
        "ema_device",
        "training.ema_device",
        "cpu" if str(device) == "cpu" else "auto",
    )
    if cfg.get("ema_resume_model"):
        result.skip(
            where,
            "ema_resume_model",
            cfg["ema_resume_model"],
            "wb starts the EMA from the base",
            unsupported=True,
        )
    elif "ema_resume_model" in cfg:
        result.skip(where, "ema_resume_model", None)


def _import_prompts(value: Any, train_json: Path, result: Ed2Import, where: str) -> None:
    if value is None:
        return
    path = train_json.parent / str(value or "")
    if not value:
        result.skip(where, "sample_prompts", value)
    elif not path.is_file():
        result.skip(where, "sample_prompts", value, "file not found beside train.json: no samples")
    elif path.suffix.lower() != ".txt":
        result.skip(
            where, "sample_prompts", value, "only a .txt of prompts is read: no samples", unsupported=True
        )
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        result.put(where, "sample_prompts", "sampling.prompts", prompts)
        result.sources.append(path)


def _finish(result: Ed2Import) -> None:
    for key in [k for k, v in result.recipe.items() if v == {}]:
        del result.recipe[key]


def write_recipe(imported: Ed2Import, output: str | os.PathLike) -> Path:
    """The imported recipe as YAML, headed by comments listing what was not imported and why."""
    output = Path(output)
    lines = [f"# Imported by `wb recipe from-ed2` from {', '.join(str(s) for s in imported.sources)}"]
    lines.append("# schedules (as EveryDream2 runs them):")
    lines.extend(f"#   {c}: {text}" for c, text in imported.schedules.items())
    for title, items in (
        ("differences from EveryDream2 (wb cannot do these)", imported.unsupported),
        ("notes", imported.notes),
        ("ignored (no effect on the weights)", imported.ignored),
    ):
        if items:
            lines.append(f"# {title}:")
            lines.extend(f"#   - {item}" for item in items)
    body = dump_yaml(imported.recipe)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
    os.replace(tmp, output)
    return output
