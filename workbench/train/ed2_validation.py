"""EveryDream2's validation json as a recipe's validation section, the way ED2's
EveryDreamValidator reads it (data/every_dream_validation.py, May 2025): its defaults, then the
file; the old key names (val_split_proportion, val_data_root) still read; manual mode validates on
its own folder without splitting the training data; ceil(p x n) items held out; fractional
every_n_epochs. Part of `wb recipe from-ed2` (ed2.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.train.ed2 import Ed2Import


def import_validation(val: dict, result: Ed2Import, where: str) -> None:
    """ED2's EveryDreamValidator: its defaults, then the file; old key names still read."""
    c = {"validate_training": True, "val_split_mode": "automatic", "auto_split_proportion": 0.15,
         "stabilize_training_loss": False, "stabilize_split_proportion": 0.15, "every_n_epochs": 1,
         "seed": 555, "extra_manual_datasets": {}}  # fmt: skip
    c.update(val)
    if "val_data_root" in c:
        c["manual_data_root"] = c["val_data_root"]
    if "val_split_proportion" in c:
        c["auto_split_proportion"] = c["val_split_proportion"]
    enabled = bool(c["validate_training"])
    result.put(where, "validate_training", "validation.enabled", enabled)
    mode = c["val_split_mode"] if enabled else None
    for key, value in val.items():
        if key in ("validate_training",):
            continue
        if key in ("documentation", "use_relative_loss", "doc"):
            result.skip(where, key, value if key != "documentation" else "...")
        elif key == "extra_manual_datasets":
            if value:
                result.skip(where, key, value, "wb validates on one set only", unsupported=True)
            else:
                result.skip(where, key, value)
        elif not enabled:
            result.skip(where, key, value, "validation is off")
        elif key in ("auto_split_proportion", "val_split_proportion"):
            if mode == "automatic" and key == (
                "val_split_proportion" if "val_split_proportion" in val else key
            ):
                result.put(where, key, "validation.split", c["auto_split_proportion"])
            else:
                result.skip(
                    where,
                    key,
                    value,
                    "not used" if mode != "automatic" else "overruled by val_split_proportion",
                )
        elif key in ("manual_data_root", "val_data_root"):
            if mode == "manual" and value:
                result.put(where, key, "validation.root", value)
            else:
                result.skip(where, key, value, "not used by the automatic split")
        elif key == "val_split_mode":
            if value not in ("automatic", "manual", "none", None):
                raise WorkbenchError(
                    f"{where}val_split_mode: {value!r}: EveryDream2 knows automatic, manual, none"
                )
            result.mapped.append(f"{where}{key} -> validation.root / validation.split")
        elif key == "stabilize_training_loss":
            result.put(where, key, "validation.stabilize_train", bool(value))
        elif key == "stabilize_split_proportion":
            if c["stabilize_training_loss"]:
                result.put(where, key, "validation.stabilize_split", value)
            else:
                result.skip(where, key, value, "stabilize_training_loss is off")
        elif key == "every_n_epochs":
            result.put(where, key, "validation.every_n_epochs", value)
        elif key == "seed":
            result.put(where, key, "validation.seed", value)
        elif key == "batch_size":
            result.put(where, key, "validation.batch_size", value)
        else:
            result.skip(where, key, value, "not an EveryDream2 validation setting")
    if not enabled:
        return
    if mode == "manual" and not c.get("manual_data_root"):
        raise WorkbenchError(
            f"{where}val_split_mode manual needs manual_data_root (EveryDream2 refuses it too)"
        )
    if mode == "none":
        result.set("validation.enabled", False)
        return
    if mode == "automatic":
        result.set("validation.split", c["auto_split_proportion"])
        result.set("validation.split_round_up", True)  # ED2 holds out ceil(p x n)
    result.set("validation.stabilize_train", bool(c["stabilize_training_loss"]))
    if c["stabilize_training_loss"]:
        result.set("validation.stabilize_split", c["stabilize_split_proportion"])
    result.set("validation.every_n_epochs", c["every_n_epochs"])
    result.set("validation.every_n_steps", None)
    result.set("validation.seed", c["seed"])
    result.set("validation.at_start", True)
