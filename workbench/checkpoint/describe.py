"""What a checkpoint is: architecture, components, dtypes, sizes, metadata and hashes.

Everything here reads headers only (dtypes and shapes), never tensor data, so describing a 7 GB
file costs milliseconds. Architecture rules follow what A1111 and ComfyUI check (shared/docs/FORMATS.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.checkpoint.hashing import autov2, sha256_file
from workbench.checkpoint.reader import Checkpoint, open_checkpoint
from workbench.checkpoint.safetensors_io import TensorInfo
from workbench.errors import WorkbenchError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
EMA = "model_ema."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0."
SDXL_TE2 = "conditioner.embedders.1."
CONV_IN = UNET + "input_blocks.0.0.weight"

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae", "ema", "other")
FAMILY_OF = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl-refiner": "sdxl"}
# Width of the UNet's first conv in the real models: anything else is a small model of that layout.
REAL_CONV_IN_WIDTH = {"sd1": 320, "sd2": 320, "sdxl": 320, "sdxl-refiner": 384}


def detect_layout(keys: Mapping[str, TensorInfo]) -> str:
    """The key layout: sd1, sd2, sdxl or sdxl-refiner. Raises WorkbenchError for anything else."""
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        return "sdxl"
    if "conditioner.embedders.0.model.ln_final.weight" in keys:
        return "sdxl-refiner"
    in_proj = keys.get(SD2_TE + "transformer.resblocks.0.attn.in_proj_weight")
    if in_proj is not None:
        return "sd2"
    if any(k.startswith(SD1_TE) for k in keys):
        return "sd1"
    if any(k.startswith(UNET) for k in keys):
        # A UNet without a text encoder: SDXL's has label_emb; SD2's has linear transformer projections.
        if UNET + "label_emb.0.0.weight" in keys:
            return "sdxl"
        proj = keys.get(UNET + "input_blocks.1.1.proj_in.weight")
        return "sd2" if proj is not None and len(proj.shape) == 2 else "sd1"
    if any(k.startswith(VAE) for k in keys):
        return "sd1"  # a VAE-only file: the SD1/SD2 VAE
    raise WorkbenchError(
        "unknown architecture: no key starts with model.diffusion_model., cond_stage_model., "
        "conditioner. or first_stage_model."
    )


# Keys whose shape wb reads to tell a model apart, with the number of dimensions they must have.
RANK_OF = {CONV_IN: 4, "attn2.to_k.weight": 2, "attn2.to_q.weight": 2}


def check_weight_ranks(keys: Mapping[str, TensorInfo], layout: str) -> None:
    """A valid file can still be the wrong model: a weight of a known component stored as a
    0-d scalar (or a conv as a vector) is refused here, by key, before any verb reads its shape."""
    for key, info in keys.items():
        want = RANK_OF.get(key) or next((r for end, r in RANK_OF.items() if key.endswith(end)), None)
        if want is not None and key.startswith(UNET) and len(info.shape) != want:
            raise WorkbenchError(
                f"{key} has shape {list(info.shape)}, an {layout} checkpoint has a {want}-d weight there: "
                "not a Stable Diffusion checkpoint wb can use"
            )
        if not info.shape and key.endswith(".weight") and component_of(key, layout) != "other":
            raise WorkbenchError(
                f"{key} is a 0-d scalar, an {layout} checkpoint has a weight tensor there: "
                "not a Stable Diffusion checkpoint wb can use"
            )


def component_of(key: str, layout: str) -> str:
    if key.startswith(UNET):
        return "unet"
    if key.startswith(VAE):
        return "vae"
    if key.startswith(EMA):
        return "ema"
    if key.startswith("cond_stage_model."):
        return "text_encoder"
    if key.startswith(SDXL_TE1):
        # The refiner's only embedder is OpenCLIP bigG, which diffusers calls text_encoder_2.
        return "text_encoder_2" if layout == "sdxl-refiner" else "text_encoder"
    if key.startswith(SDXL_TE2):
        return "text_encoder_2"
    return "other"


def split_components(keys: Mapping[str, TensorInfo], layout: str) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for k in keys:
        parts[component_of(k, layout)].append(k)
    return parts


def detect_architecture(
    keys: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> tuple[str, str, list[str]]:
    """(architecture, layout, variants). `toy` is a model in a real layout with non-real widths."""
    layout = detect_layout(keys)
    check_weight_ranks(keys, layout)
    variants: list[str] = []
    conv_in = keys.get(CONV_IN)
    if conv_in is not None and len(conv_in.shape) == 4:
        in_ch = conv_in.shape[1]
        if in_ch == 9:
            variants.append("inpaint")
        elif in_ch == 8:
            variants.append("instruct-pix2pix")
    prediction = (metadata.get("modelspec.prediction_type") or "").lower()
    if "v_pred" in keys or prediction.startswith("v"):
        variants.append("v-prediction")
    architecture = layout
    if metadata.get("wb.architecture") == "toy":
        architecture = "toy"
    elif conv_in is not None and conv_in.shape[0] != REAL_CONV_IN_WIDTH[layout]:
        architecture = "toy"
    return architecture, layout, variants


@dataclass
class ComponentSummary:
    keys: int
    params: int
    bytes: int
    dtypes: dict[str, int]  # dtype -> number of parameters in it


@dataclass
class Description:
    path: str
    format: str
    architecture: str
    layout: str
    variants: list[str]
    components: dict[str, ComponentSummary]
    metadata: dict[str, str]
    size_bytes: int
    tensor_bytes: int
    sha256: str | None = None
    autov2: str | None = None
    ancestry: dict | None = field(default=None)
    # Metadata wb itself reads (wb.swap, sd_merge_models, ...) that is not what wb wrote there.
    warnings: list[str] = field(default_factory=list)

    def usable_metadata(self) -> dict[str, str]:
        """The metadata without the JSON fields that failed to parse (see `warnings`)."""
        bad = {w.split(":", 1)[0] for w in self.warnings}
        return {k: v for k, v in self.metadata.items() if k not in bad}

    def to_json(self) -> dict:
        return asdict(self)


def summarize(infos: Mapping[str, TensorInfo], keys: list[str]) -> ComponentSummary:
    dtypes: dict[str, int] = {}
    params = nbytes = 0
    for k in keys:
        info = infos[k]
        params += info.numel
        nbytes += info.nbytes
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    return ComponentSummary(len(keys), params, nbytes, dtypes)


def _path_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def describe(path: str | os.PathLike | Checkpoint, with_hash: bool = True) -> Description:
    """Describe a checkpoint from its header. `with_hash` adds sha256 and AutoV2 (reads the file once)."""
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    try:
        architecture, layout, variants = detect_architecture(ckpt.infos, ckpt.metadata)
    except WorkbenchError as e:
        raise WorkbenchError(f"{ckpt.path}: {e}") from None
    parts = split_components(ckpt.infos, layout)
    components = {name: summarize(ckpt.infos, keys) for name, keys in parts.items() if keys}
    digest = None
    if with_hash and ckpt.path.is_file():
        digest = sha256_file(ckpt.path)
    parsed, warnings = json_metadata(ckpt.metadata)
    ancestry = None
    if "sd_merge_models" in parsed or "sd_merge_recipe" in parsed:
        ancestry = {k: parsed[k] for k in ("sd_merge_recipe", "sd_merge_models") if k in parsed}
    return Description(
        path=str(ckpt.path),
        format=ckpt.format,
        architecture=architecture,
        layout=layout,
        variants=variants,
        components=components,
        metadata=dict(ckpt.metadata),
        size_bytes=_path_size(ckpt.path),
        tensor_bytes=ckpt.nbytes,
        sha256=digest,
        autov2=autov2(digest) if digest else None,
        ancestry=ancestry,
        warnings=warnings,
    )


# Metadata fields holding JSON that wb reads back: each must be a JSON object.
JSON_METADATA = ("wb.swap", "sd_merge_models", "sd_merge_recipe", "wb.merge_recipe", "wb.diffusers_configs")


def json_metadata(metadata: Mapping[str, str]) -> tuple[dict[str, dict], list[str]]:
    """The JSON fields wb reads, parsed, and one warning per field that is not a JSON object of the
    expected shape (any file can carry any metadata: it is reported, never a crash)."""
    parsed: dict[str, dict] = {}
    warnings: list[str] = []
    for name in JSON_METADATA:
        if name not in metadata:
            continue
        try:
            value = json.loads(metadata[name])
        except RecursionError:
            warnings.append(f"{name}: nested too deep to be wb's JSON; ignored")
            continue
        except ValueError as e:
            warnings.append(f"{name}: not valid JSON ({str(e).splitlines()[0]}); ignored")
            continue
        bad = _shape_problem(name, value)
        if bad:
            warnings.append(f"{name}: {bad}; ignored")
            continue
        parsed[name] = value
    return parsed, warnings


def _shape_problem(name: str, value: object) -> str | None:
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__.replace('NoneType', 'null')}, not an object"
    if name in ("wb.swap", "sd_merge_models", "wb.diffusers_configs"):
        for k, v in value.items():
            if not isinstance(v, dict):
                return f"entry {k!r} is not an object"
            strings = all(isinstance(v.get(f, ""), str | None) for f in ("path", "sha256"))
            if name == "wb.swap" and not strings:
                return f"entry {k!r} has a path or sha256 that is not a string"
    return None
