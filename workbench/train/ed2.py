"""Import an EveryDream2 configuration (train.json + optimizer_config + validation_config) as a recipe.

Every key of every file ends up in exactly one list of the result: `mapped` (into which recipe
field), `unsupported` (it would change training and wb cannot do it yet: printed as a warning and
written at the top of the recipe), or `ignored` (no effect in wb: a GPU index, a log folder, a
feature switched off). Nothing is dropped silently. Where EveryDream2's behaviour differs from what
its config says, the recipe follows the config and a note says so (FORMATS.md, "known ED2 traps"):
- a text-encoder override of 0 means 0 in wb (ED2 silently used the base value);
- an unknown optimizer name is an error (ED2 silently used adamw8bit);
- lr, lr_scheduler, lr_warmup_steps and lr_decay_steps in train.json override optimizer.json, as
  in ED2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.checkpoint.files import refuse_overwrite, write_text_atomic
from workbench.documents import load_json_file
from workbench.errors import WorkbenchError
from workbench.train.optimizers import OPTIMIZERS
from workbench.train.recipe import dump_yaml, parse_recipe

# Keys with no effect in wb whatever their value: where files go, UI and logging switches.
NO_EFFECT = {
    "config", "notebook", "logdir", "save_ckpt_dir", "run_name", "disable_xformers", "useadam8bit",
    "write_schedule", "gpuid", "attn_type", "log_grad_norm", "apply_grad_scaler_step_tweaks", "doc",
}  # fmt: skip

# train.json key -> recipe field, copied as they are (null: ED2's default, so left out).
TRAIN_KEYS = {
    "batch_size": "training.batch_size",
    "grad_accum": "training.grad_accum",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "max_epochs": "training.max_epochs",
    "zero_frequency_noise_ratio": "training.zero_frequency_noise_ratio",
    "resolution": "data.resolution",
    "flip_p": "data.flip_p",
    "cond_dropout": "data.cond_dropout",
    "shuffle_tags": "data.shuffle_tags",
    "data_root": "data.root",
    "resume_ckpt": "model.base",
    "save_every_n_epochs": "saving.every_n_epochs",
    "log_step": "logging.every_n_steps",
    "timestep_start": "training.timestep_min",
}
# train.json keys whose "off" value (null/0/false) means "not set": mapped only when on.
TRAIN_OPTIONAL = {
    "clip_grad_norm": "training.clip_grad_norm",
    "min_snr_gamma": "training.min_snr_gamma",
    "ckpt_every_n_minutes": "saving.every_n_minutes",
    "lr": "optimizer.lr",
    "lr_scheduler": "schedule.name",
    "lr_warmup_steps": "schedule.warmup_steps",
    "lr_decay_steps": "schedule.decay_steps",
}
# optimizer.json section keys -> recipe optimizer fields.
OPTIMIZER_KEYS = {
    "optimizer": "name", "lr": "lr", "betas": "betas", "epsilon": "eps", "weight_decay": "weight_decay",
    "momentum": "momentum", "d0": "d0", "decouple": "decouple", "growth_rate": "growth_rate",
    "safeguard_warmup": "safeguard_warmup", "use_bias_correction": "use_bias_correction",
}  # fmt: skip
SCHEDULE_KEYS = {"lr_scheduler": "name", "lr_warmup_steps": "warmup_steps", "lr_decay_steps": "decay_steps"}
VALIDATION_KEYS = {
    "validate_training": "enabled",
    "val_split_proportion": "split",
    "stabilize_training_loss": "stabilize_train",
    "stabilize_split_proportion": "stabilize_split",
    "every_n_epochs": "every_n_epochs",
    "seed": "seed",
}


@dataclass
class Ed2Import:
    recipe: dict = field(default_factory=dict)  # a raw recipe, validated before import_ed2 returns
    mapped: list[str] = field(default_factory=list)  # "file:key -> recipe.field"
    unsupported: list[str] = field(default_factory=list)  # "file:key=value (why)": would change training
    ignored: list[str] = field(default_factory=list)  # "file:key=value": no effect in wb
    notes: list[str] = field(default_factory=list)  # where wb's reading differs from ED2's behaviour
    sources: list[Path] = field(default_factory=list)

    def put(self, where: str, key: str, path: str, value: Any) -> None:
        node = self.recipe
        *sections, name = path.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
        self.mapped.append(f"{where}{key} -> {path}")

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.recipe
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def pop(self, path: str) -> Any:
        *sections, name = path.split(".")
        node = self.recipe
        for section in sections:
            node = node.get(section, {})
        return node.pop(name, None)

    def skip(self, where: str, key: str, value: Any, why: str = "", unsupported: bool = False) -> None:
        item = f"{where}{key}={json.dumps(value)}" + (f" ({why})" if why else "")
        (self.unsupported if unsupported else self.ignored).append(item)


def _off(value: Any) -> bool:
    """ED2's "feature off" values."""
    return value is None or value is False or value == 0 or value == "" or value == []


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise WorkbenchError(f"{path}: no such {what}")
    data = load_json_file(path, "")  # regular file, bounded size, UTF-8, no duplicate keys
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a JSON object")
    return data


def _beside(train_json: Path, name: str, key: str) -> Path:
    """ED2 resolves these from its working folder; users keep them beside train.json."""
    for candidate in (train_json.parent / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise WorkbenchError(f"{train_json}: {key} {name!r} not found beside it ({train_json.parent / name})")


def import_ed2(train_json: str | os.PathLike) -> Ed2Import:
    """Read train.json and the files it names; return the recipe and an account of every key."""
    train_json = Path(train_json)
    cfg = _read_json(train_json, "EveryDream2 train.json")
    result = Ed2Import(sources=[train_json])
    where = f"{train_json.name}:"
    if cfg.get("optimizer_config"):
        path = _beside(train_json, cfg["optimizer_config"], "optimizer_config")
        result.sources.append(path)
        result.mapped.append(f"{where}optimizer_config -> (read: {path.name})")
        _import_optimizer(_read_json(path, "optimizer config"), result, f"{path.name}:")
    else:
        result.skip(where, "optimizer_config", cfg.get("optimizer_config"), "ED2's defaults: adamw8bit")
    if cfg.get("validation_config"):
        path = _beside(train_json, cfg["validation_config"], "validation_config")
        result.sources.append(path)
        result.mapped.append(f"{where}validation_config -> (read: {path.name})")
        _import_validation(_read_json(path, "validation config"), result, f"{path.name}:")
    else:
        result.put(where, "validation_config", "validation.enabled", False)  # ED2 validates only with one
    _import_train(cfg, train_json, result, where)
    _finish(result)
    parse_recipe(result.recipe, f"{train_json} (imported)")  # fail here, naming the field, not later
    return result


def _import_train(cfg: dict, train_json: Path, result: Ed2Import, where: str) -> None:
    for key, value in cfg.items():
        if key in ("optimizer_config", "validation_config"):
            continue
        if key in TRAIN_KEYS:
            if value is None:
                result.skip(where, key, value, "null: the default")
            elif key == "resume_ckpt":
                result.put(where, key, "model.base", value)
                if not re.search(r"\.(safetensors|ckpt|pt|pth|bin)$", str(value)):
                    result.notes.append(
                        f"model.base {value!r} is an EveryDream2 model name: point it at the "
                        "checkpoint file (e.g. models/sd15.safetensors)"
                    )
            else:
                result.put(where, key, TRAIN_KEYS[key], value)
                if key == "data_root" and "\\" in str(value):
                    result.notes.append(f"data.root {value!r} is a Windows path: point it at the images here")
        elif key in TRAIN_OPTIONAL:
            if _off(value):
                result.skip(where, key, value, "not set here")
            else:  # read after optimizer.json, so train.json wins, as in ED2
                result.put(where, key, TRAIN_OPTIONAL[key], value)
        elif key == "seed":
            if value == -1:
                result.skip(
                    where, key, value, "a random seed; wb needs a fixed one: using 555", unsupported=True
                )
            else:
                result.put(where, key, "training.seed", value)
        elif key == "timestep_end":
            result.put(where, key, "training.timestep_max", value - 1)  # ED2's randint: end exclusive
        elif key in ("amp", "disable_amp"):
            off = (key == "amp" and value is False) or (key == "disable_amp" and value is True)
            if off:
                result.put(where, key, "training.mixed_precision", "no")
            else:
                result.skip(where, key, value, "mixed precision is on by default: bf16/fp16 on GPUs")
        elif key == "project_name":
            name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(value or "")).strip("_.")
            if name:
                result.put(where, key, "saving.name", name)
            else:
                result.skip(where, key, value)
        elif key == "disable_textenc_training":
            if value:
                result.put(where, key, "text_encoder.train", False)
            else:
                result.skip(where, key, value, "the text encoder trains by default")
        elif key == "disable_unet_training":
            if value:
                result.put(where, key, "unet.train", False)
            else:
                result.skip(where, key, value, "the UNet trains by default")
        elif key == "save_full_precision":
            if value:
                result.put(where, key, "saving.dtype", "fp32")
            else:
                result.skip(where, key, value, "fp16 is the default")
        elif key in ("ema_decay_rate", "ema_strength_target") and value is not None:
            field = "ema_decay" if key == "ema_decay_rate" else "ema_strength_target"
            result.put(where, key, f"training.{field}", value)
        elif key == "ema_update_interval" and (cfg.get("ema_decay_rate") or cfg.get("ema_strength_target")):
            result.put(where, key, "training.ema_every_n_steps", value)
            if (cfg.get("grad_accum") or 1) > 1:
                result.notes.append(
                    "ema_update_interval: EveryDream2 counts batches, wb counts optimizer steps "
                    "(batches / grad_accum)"
                )
        elif key == "ema_device" and (cfg.get("ema_decay_rate") or cfg.get("ema_strength_target")):
            result.put(where, key, "training.ema_device", "cpu" if str(value) == "cpu" else "auto")
        elif key in ("ema_sample_nonema_model", "ema_sample_ema_model"):
            result.skip(where, key, value, "samples use the training weights; the -ema checkpoints are saved")
        elif key == "sample_prompts":
            _import_prompts(value, train_json, result, where)
        elif key == "sample_steps":
            if cfg.get("sample_prompts") and result.get("sampling.prompts"):
                result.put(where, key, "sampling.every_n_steps", value)
            else:
                result.skip(where, key, value, "no sample prompts were imported")
        elif key in NO_EFFECT:
            result.skip(where, key, value)
        elif key.startswith("rated_dataset_") and not cfg.get("rated_dataset"):
            result.skip(where, key, value, "rated_dataset is off")
        elif _off(value):
            result.skip(where, key, value, "off")
        else:
            result.skip(where, key, value, unsupported=True)
    if result.get("training.max_epochs") is None:
        result.recipe.setdefault("training", {})["max_epochs"] = 1  # ED2's default
    if (result.get("data.resolution") or 512) % 64 == 0:  # ED2 always trains in buckets (of 64 px steps)
        result.recipe.setdefault("data", {})["aspect_buckets"] = True
    if result.get("data.shuffle_tags"):
        result.notes.append("shuffle_tags: wb keeps the first tag in place and shuffles the rest")


def _import_optimizer(opt: dict, result: Ed2Import, where: str) -> None:
    for key, value in opt.items():
        if key == "base":
            _optimizer_section(value or {}, result, f"{where}base.", "optimizer.")
        elif key == "text_encoder_overrides":
            _optimizer_section(
                value or {}, result, f"{where}text_encoder_overrides.", "optimizer.text_encoder."
            )
            if result.get("optimizer.text_encoder.lr") == 0:
                result.notes.append(
                    "text_encoder_overrides.lr is 0: wb does not train the text encoder at all "
                    "(EveryDream2 silently used the base lr instead)"
                )
        elif key == "text_encoder_lr_scale":
            if value is None or value == 1:
                result.skip(where, key, value, "no scaling")
            else:
                result.mapped.append(f"{where}{key} -> optimizer.text_encoder.lr (base lr x {value})")
                result.recipe.setdefault("_lr_scale", value)
        elif key == "text_encoder_freezing":
            _freezing(value or {}, result, f"{where}text_encoder_freezing.")
        elif key in NO_EFFECT or _off(value):
            result.skip(where, key, value)
        else:
            result.skip(where, key, value, unsupported=True)


def _optimizer_section(src: dict, result: Ed2Import, where: str, prefix: str) -> None:
    te = prefix.endswith("text_encoder.")
    for key, value in src.items():
        if value is None:
            result.skip(where, key, value, "null: inherits the base value" if te else "null: the default")
        elif key in OPTIMIZER_KEYS:
            result.put(where, key, prefix + OPTIMIZER_KEYS[key], value)
        elif key in SCHEDULE_KEYS and not te:
            if key != "lr_scheduler" and value == 0:
                result.skip(where, key, value, "0: the default")
            else:
                result.put(where, key, "schedule." + SCHEDULE_KEYS[key], value)
        elif key in SCHEDULE_KEYS:
            result.skip(where, key, value, "wb gives both components one schedule shape", unsupported=True)
        else:
            result.skip(where, key, value, unsupported=True)


def _freezing(src: dict, result: Ed2Import, where: str) -> None:
    for key, value in src.items():
        if key in ("unfreeze_last_n_layers", "unfreeze_final_n_layers") and value is not None:
            result.put(where, key, "text_encoder.unfreeze_last_n_layers", value)
        elif key in ("freeze_embeddings", "freeze_final_layer_norm") and value is not None:
            result.put(where, key, f"text_encoder.{key}", value)
        elif _off(value):
            result.skip(where, key, value)
        else:
            result.skip(where, key, value, unsupported=True)
    if result.get("text_encoder.unfreeze_last_n_layers") is not None and "freeze_embeddings" not in src:
        result.recipe["text_encoder"]["freeze_embeddings"] = True
        result.notes.append(
            "text_encoder.freeze_embeddings: true, as EveryDream2 does when only the last layers are unfrozen"
        )


def _import_validation(val: dict, result: Ed2Import, where: str) -> None:
    for key, value in val.items():
        if key in VALIDATION_KEYS and value is not None:
            result.put(where, key, "validation." + VALIDATION_KEYS[key], value)
        elif key == "val_split_mode" and value == "automatic":
            result.skip(where, key, value, "wb splits automatically")
        elif key == "val_split_mode":
            result.skip(where, key, value, "wb only splits automatically", unsupported=True)
        elif _off(value):
            result.skip(where, key, value)
        else:
            result.skip(where, key, value, unsupported=True)
    if result.get("validation.stabilize_train") is False:
        result.pop("validation.stabilize_split")


def _import_prompts(value: Any, train_json: Path, result: Ed2Import, where: str) -> None:
    path = train_json.parent / str(value or "")
    if not value:
        result.skip(where, "sample_prompts", value)
    elif not path.is_file():
        result.skip(where, "sample_prompts", value, "file not found beside train.json", unsupported=True)
    elif path.suffix.lower() != ".txt":
        result.skip(where, "sample_prompts", value, "only a .txt of prompts is read", unsupported=True)
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        result.put(where, "sample_prompts", "sampling.prompts", prompts)
        result.sources.append(path)


def _finish(result: Ed2Import) -> None:
    """What needs the whole picture: ED2's default optimizer, the TE lr scale, and options that the
    chosen optimizer does not have (ED2 passes them and they do nothing; a wb recipe refuses them)."""
    r = result.recipe
    opt = r.setdefault("optimizer", {})
    opt.setdefault("name", "adamw8bit")  # ED2's default
    te = opt.get("text_encoder", {})
    scale = r.pop("_lr_scale", None)
    if scale is not None and te.get("lr") is None and opt.get("lr") is not None:
        opt.setdefault("text_encoder", te)["lr"] = opt["lr"] * scale
        result.notes.append(f"text encoder lr = {opt['lr']} x text_encoder_lr_scale {scale}")
    for section, label in ((opt, "optimizer"), (te, "optimizer.text_encoder")):
        name = section.get("name", opt["name"])
        spec = OPTIMIZERS.get(name)
        for option in [o for o in section if o not in ("name", "lr", "text_encoder")]:
            if spec is not None and option not in spec.options:
                value = section.pop(option)
                result.ignored.append(f"{label}.{option}={json.dumps(value)} (unused by {name}; dropped)")
    sched = r.get("schedule", {})
    name = sched.get("name", "constant")
    unused = {"constant": ("warmup_steps", "decay_steps"), "constant_with_warmup": ("decay_steps",)}
    for option in unused.get(name, ()):
        if option in sched:
            result.ignored.append(f"schedule.{option}={sched.pop(option)} (unused by {name}; dropped)")
    if name == "linear" and sched.get("warmup_steps"):
        result.notes.append(
            f"schedule linear with warmup_steps {sched['warmup_steps']}: the lr rises 0 -> lr over those "
            "steps, then decays to 0 by the end of the run; for an LR range test over the whole run, "
            "schedule.name: linear_ramp does it for any run length"
        )
    for key in [k for k, v in r.items() if v == {}]:
        del r[key]


def write_recipe(imported: Ed2Import, output: str | os.PathLike) -> Path:
    """The imported recipe as YAML, headed by comments listing what was not imported and why."""
    output = Path(output)
    lines = [f"# Imported by `wb recipe from-ed2` from {', '.join(str(s) for s in imported.sources)}"]
    for title, items in (
        ("NOT imported (would change training; wb has no equivalent yet)", imported.unsupported),
        ("notes", imported.notes),
        ("ignored (no effect in wb)", imported.ignored),
    ):
        if items:
            lines.append(f"# {title}:")
            lines.extend(f"#   - {item}" for item in items)
    body = dump_yaml(imported.recipe)
    inputs = [(f"the ED2 file {s.name}", s) for s in imported.sources]
    refuse_overwrite(output, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(output, "\n".join(lines) + "\n" + body, "the imported recipe", inputs)
