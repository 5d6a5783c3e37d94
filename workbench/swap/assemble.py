"""Assemble a checkpoint from the components of several (`wb swap --unet X --te Y`).

Seed 004 found its "burnt" component by swapping UNet and text encoder between a fresh model and
a fine-tune by hand. This does it as a streaming copy: every tensor is taken byte for byte from the
file that supplies its component, through the checkpoint core's writer, and the output's metadata
records which file (by sha256) supplied which component.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from workbench import __version__
from workbench.checkpoint.describe import component_of, detect_architecture
from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.reader import Checkpoint, open_checkpoint
from workbench.checkpoint.safetensors_io import SafetensorsWriter
from workbench.errors import WorkbenchError

# Where each component's width shows: the UNet's cross-attention input must equal the text
# encoder's output width (768 for CLIP-L, 1024 for OpenCLIP-H, 768 + 1280 for SDXL).
TE_WIDTH_KEYS = {
    "sd1": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    "sd2": ["cond_stage_model.model.ln_final.weight"],
    "sdxl": [
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight",
    ],
}


@dataclass
class SwapResult:
    path: Path
    sources: dict[str, str]  # component -> source path
    keys: dict[str, int]  # component -> number of keys written
    metadata: dict[str, str] = field(default_factory=dict)


def _open(path: str | os.PathLike, role: str) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except WorkbenchError as e:
        raise WorkbenchError(f"{role}: {e}") from None


def _cross_attention_width(ckpt: Checkpoint) -> int | None:
    for key, info in ckpt.infos.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            return info.shape[1]
    return None


def _te_width(ckpt: Checkpoint, layout: str) -> int | None:
    keys = TE_WIDTH_KEYS.get(layout, [])
    if not all(k in ckpt.infos for k in keys):
        return None
    return sum(ckpt.infos[k].shape[0] for k in keys)


def swap_components(
    out: str | os.PathLike,
    unet: str | os.PathLike,
    text_encoder: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    te_l: str | os.PathLike | None = None,
    te_g: str | os.PathLike | None = None,
) -> SwapResult:
    """Write `out` with the UNet of `unet`, the text encoder(s) of `text_encoder` (SDXL: `te_l` and
    `te_g` pick the two apart), the VAE of `vae` (default: `base`, else the TE source) and every
    other key from `base` (default: the TE source)."""
    te_default = text_encoder or te_l or te_g
    if te_default is None:
        raise WorkbenchError(
            "--te: give the checkpoint whose text encoder to use (or --te-l / --te-g for SDXL)"
        )
    base = base or te_default
    roles = {
        "unet": unet,
        "text_encoder": te_l or text_encoder or base,
        "text_encoder_2": te_g or text_encoder or base,
        "vae": vae or base,
        "other": base,
    }
    opened: dict[str, Checkpoint] = {}
    for path in dict.fromkeys(str(p) for p in roles.values()):
        opened[path] = _open(path, Path(path).name)
    sources = {c: opened[str(p)] for c, p in roles.items()}

    layouts = {}
    for path, ckpt in opened.items():
        try:
            _, layout, _ = detect_architecture(ckpt.infos, ckpt.metadata)
        except WorkbenchError as e:
            raise WorkbenchError(f"{path}: {e}") from None
        layouts[path] = layout
    if len(set(layouts.values())) > 1:
        listing = ", ".join(f"{Path(p).name} is {lay}" for p, lay in layouts.items())
        raise WorkbenchError(f"mismatched architectures: {listing}")
    layout = next(iter(layouts.values()))
    if layout == "sdxl-refiner":
        raise WorkbenchError("swapping components of SDXL refiner checkpoints is not supported")
    if layout != "sdxl" and (te_l or te_g):
        raise WorkbenchError("--te-l / --te-g are for SDXL checkpoints; this is " + layout)

    wanted = (
        ("unet", "text_encoder", "text_encoder_2", "vae")
        if layout == "sdxl"
        else ("unet", "text_encoder", "vae")
    )
    # EMA weights shadow the UNet they were averaged from, so they travel with the UNet.
    supplier = {
        "unet": "unet",
        "ema": "unet",
        "text_encoder": "text_encoder",
        "text_encoder_2": "text_encoder_2",
        "vae": "vae",
        "other": "other",
    }
    plan, take_from, keys_per_component = {}, {}, {}
    for part, role in supplier.items():
        ckpt = sources[role]
        keys = [k for k in ckpt.infos if component_of(k, layout) == part]
        if part in wanted and not keys:
            raise WorkbenchError(f"{ckpt.path}: has no {part} keys to take")
        for key in keys:
            plan[key], take_from[key] = ckpt.infos[key], ckpt
        if keys:
            keys_per_component[part] = len(keys)

    cross = _cross_attention_width(sources["unet"])
    te_width = _te_width(sources["text_encoder"], layout) if layout != "sdxl" else None
    if layout == "sdxl":
        w1 = _te_width_part(sources["text_encoder"], TE_WIDTH_KEYS["sdxl"][0])
        w2 = _te_width_part(sources["text_encoder_2"], TE_WIDTH_KEYS["sdxl"][1])
        te_width = w1 + w2 if w1 and w2 else None
    if cross is not None and te_width is not None and cross != te_width:
        raise WorkbenchError(
            f"mismatched architectures: the UNet of {sources['unet'].path.name} expects text features "
            f"of width {cross}, the text encoder of {sources['text_encoder'].path.name} gives {te_width}"
        )

    record = {}
    for component in (*wanted, "other"):
        ckpt = sources[component]
        record[component] = {
            "path": str(ckpt.path),
            "sha256": sha256_file(ckpt.path) if ckpt.path.is_file() else None,
        }
    metadata = {
        "format": "pt",
        "wb.swap": json.dumps(record, sort_keys=True),
        "wb.made_by": "wb swap",
        "wb.version": __version__,
    }
    for key in ("wb.architecture", "wb.diffusers_configs", "modelspec.architecture"):
        if key in sources["unet"].metadata:
            metadata[key] = sources["unet"].metadata[key]
    metadata["modelspec.title"] = f"unet {sources['unet'].path.stem} + te {sources['text_encoder'].path.stem}"

    out = Path(out)
    with SafetensorsWriter(out, plan, metadata, inputs=[c.path for c in opened.values()]) as writer:
        for key in plan:
            writer.write(key, take_from[key][key])
    return SwapResult(
        out,
        {c: str(s.path) for c, s in sources.items() if c in (*wanted, "other")},
        keys_per_component,
        metadata,
    )


def _te_width_part(ckpt: Checkpoint, key: str) -> int | None:
    info = ckpt.infos.get(key)
    return info.shape[0] if info is not None else None
