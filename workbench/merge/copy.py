"""`wb merge copy`: A1111's "No interpolation": model A as it is, optionally with a VAE baked in,
the EMA pruned, float tensors converted and keys discarded, streamed tensor by tensor.

A1111's rules (modules/extras.py, run_modelmerger): a VAE file's keys replace A's
`first_stage_model.<key>` where A has that key; "save as float16" casts float32 tensors (every one,
buffers included, since nothing was merged) and leaves other dtypes alone; "Discard weights with
matching name" drops every key the regular expression finds (re.search). wb adds `--prune-ema`
(drop `model_ema.*`) and `--dtype bf16|fp32`. The output records an A1111 `sd_merge_recipe`
(`interp_method: No interpolation`) and `sd_merge_models`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.checkpoint.describe import detect_architecture
from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.reader import open_checkpoint, with_current_key_names
from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo
from workbench.errors import WorkbenchError
from workbench.merge.provenance import INHERITED, legacy_hash, parse_json_field
from workbench.merge.recipe import DTYPES

VAE_PREFIX = "first_stage_model."
VAE_FILE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass
class CopyResult:
    path: Path
    keys: int
    baked: int  # VAE tensors replaced
    dropped: list[str]  # keys pruned or discarded
    cast: int  # tensors converted
    bytes: int
    metadata: dict[str, str]


def _vae_tensors(path: Path) -> tuple[object, dict[str, str]]:
    """The VAE file opened, and A's key -> the VAE file's key for each VAE tensor it holds."""
    ckpt = open_checkpoint(path)
    keys = list(ckpt.keys())
    if any(k.startswith(VAE_PREFIX) for k in keys):  # a whole checkpoint: its VAE
        return ckpt, {k: k for k in keys if k.startswith(VAE_PREFIX)}
    mapping = {VAE_PREFIX + k: k for k in keys if k.startswith(VAE_FILE_PREFIXES)}
    if not mapping:
        ckpt.close()
        raise WorkbenchError(f"--bake-vae {path}: no VAE tensors (encoder.*, decoder.*, first_stage_model.*)")
    return ckpt, mapping


def _out_dtype(dtype: str, want: str | None) -> str:
    if want is None or dtype not in TORCH_DTYPES:
        return dtype
    if want == "F32":
        return "F32"
    return want if dtype == "F32" else dtype  # A1111's to_half: only float32 is converted


def copy_checkpoint(
    a: str | os.PathLike,
    out: str | os.PathLike,
    bake_vae: str | os.PathLike | None = None,
    prune_ema: bool = False,
    dtype: str | None = None,
    discard: str | None = None,
    command: str | None = None,
) -> CopyResult:
    """Write A (with the VAE baked in, the EMA pruned, dtypes converted, keys discarded) to `out`."""
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise WorkbenchError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        pattern = re.compile(discard) if discard else None
    except re.error as e:
        raise WorkbenchError(f"--discard {discard!r}: not a regular expression: {e}") from None
    src = with_current_key_names(open_checkpoint(a))
    vae, vae_map = (None, {}) if bake_vae is None else _vae_tensors(Path(bake_vae))
    try:
        detect_architecture(src.infos, src.metadata)
        want = DTYPES[dtype] if dtype else None
        plan: dict[str, TensorInfo] = {}
        dropped: list[str] = []
        baked = 0
        for key, info in src.infos.items():
            if (prune_ema and key.startswith("model_ema.")) or (pattern and pattern.search(key)):
                dropped.append(key)
                continue
            if key in vae_map:
                v = vae.infos[vae_map[key]]
                if tuple(v.shape) != tuple(info.shape):
                    shapes = f"{vae_map[key]} is {list(v.shape)}, A's {key} is {list(info.shape)}"
                    raise WorkbenchError(f"--bake-vae {bake_vae}: {shapes}")
                info, baked = v, baked + 1
            plan[key] = TensorInfo(_out_dtype(info.dtype, want), info.shape)
        metadata = _metadata(src, Path(a), out, bake_vae, dtype, discard, prune_ema, command)
        cast = 0
        inputs = [Path(a)] + ([Path(bake_vae)] if bake_vae else [])
        with SafetensorsWriter(out, plan, metadata, inputs=inputs) as writer:
            for key, info in plan.items():
                tensor = vae[vae_map[key]] if key in vae_map else src[key]
                if info.dtype in TORCH_DTYPES and tensor.dtype != TORCH_DTYPES[info.dtype]:
                    tensor, cast = tensor.to(TORCH_DTYPES[info.dtype]), cast + 1
                writer.write(key, tensor)
    finally:
        src.close()
        if vae is not None:
            vae.close()
    return CopyResult(out, len(plan), baked, dropped, cast, out.stat().st_size, metadata)


def _metadata(src, a: Path, out: Path, bake_vae, dtype, discard, prune_ema, command) -> dict[str, str]:
    sha = sha256_file(a) if a.is_file() else None
    models = {}
    parent = parse_json_field(src.metadata, "sd_merge_models")
    if isinstance(parent, dict):
        models.update(parent)
    if sha:
        models[sha] = {
            "name": a.name,
            "legacy_hash": legacy_hash(a),
            "sd_merge_recipe": parse_json_field(src.metadata, "sd_merge_recipe"),
        }
    _, _, variants = detect_architecture(src.infos, src.metadata)
    recipe = {
        "type": "wb-merge",
        "primary_model_hash": sha,
        "secondary_model_hash": None,
        "tertiary_model_hash": None,
        "interp_method": "No interpolation",
        "multiplier": 0,
        "save_as_half": dtype == "fp16",
        "custom_name": out.stem,
        "config_source": 0,
        "bake_in_vae": Path(bake_vae).name if bake_vae else "None",
        "discard_weights": discard or "",
        "is_inpainting": "inpaint" in variants,
        "is_instruct_pix2pix": "instruct-pix2pix" in variants,
        "wb_method": "copy",
        "wb_prune_ema": prune_ema,
        "wb_dtype": dtype,
    }
    meta = {k: src.metadata[k] for k in INHERITED if k in src.metadata}
    meta["format"] = "pt"
    meta["sd_merge_recipe"] = json.dumps(recipe)
    meta["sd_merge_models"] = json.dumps(models)
    if command:
        meta["wb.made_by"] = command
    return meta
