"""A diffusers model folder, seen as a lazy single-file (LDM) checkpoint.

Each component folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`) holds a config.json and
weights (`*.safetensors`, possibly sharded with an index, or a weights-only `.bin`). The renaming
plan from the converter maps every LDM key to the diffusers keys it is made from, so shapes are
known from headers and each tensor is built only when asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from workbench.checkpoint.convert import (
    LdmSource,
    build_ldm_tensor,
    diffusers_to_ldm_plan,
    planned_shape_dtype,
)
from workbench.checkpoint.reader import Checkpoint, load_pickle_weights_only
from workbench.checkpoint.safetensors_io import SafetensorsFile, TensorInfo, dtype_names, info_of
from workbench.errors import WorkbenchError

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class _ComponentWeights:
    """Key -> tensor for one component folder, over one or several files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.infos: dict[str, TensorInfo] = {}
        self._where: dict[str, object] = {}
        files = self._weight_files(folder)
        for f in files:
            if f.suffix == ".safetensors":
                st = SafetensorsFile(f)
                for k, info in st.header.infos.items():
                    self.infos[k], self._where[k] = info, st
            else:
                state = load_pickle_weights_only(f)
                if not isinstance(state, Mapping):
                    raise WorkbenchError(f"{f}: not a state dict")
                for k, t in state.items():
                    if isinstance(t, torch.Tensor):
                        self.infos[k], self._where[k] = info_of(t), t

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        for stem in WEIGHT_NAMES:
            for variant in ("", ".fp16"):
                index = folder / f"{stem}{variant}.safetensors.index.json"
                if index.exists():
                    weight_map = json.loads(index.read_text())["weight_map"]
                    return sorted({folder / name for name in weight_map.values()})
                single = folder / f"{stem}{variant}.safetensors"
                if single.exists():
                    return [single]
        for stem in ("diffusion_pytorch_model", "pytorch_model"):
            for variant in ("", ".fp16"):
                binary = folder / f"{stem}{variant}.bin"
                if binary.exists():
                    return [binary]
        raise WorkbenchError(f"{folder}: no weights file (*.safetensors or *.bin) in this component folder")

    def tensor(self, key: str) -> torch.Tensor:
        where = self._where[key]
        return where.tensor(key) if isinstance(where, SafetensorsFile) else where


def _family(root: Path, configs: dict[str, dict]) -> str:
    index = (
        json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").exists() else {}
    )
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in configs:
        return "sdxl"
    return "sd2" if configs.get("text_encoder", {}).get("hidden_size") == 1024 else "sd1"


def _info_of_source(src: LdmSource, parts: dict[str, _ComponentWeights]) -> TensorInfo:
    def info(component: str, key: str):
        i = parts[component].infos[key]
        return i.shape, i.torch_dtype

    shape, dtype = planned_shape_dtype(src, info)
    return TensorInfo(dtype_names()[dtype], tuple(shape))


def open_diffusers_folder(root: Path) -> Checkpoint:
    parts: dict[str, _ComponentWeights] = {}
    configs: dict[str, dict] = {}
    for name in COMPONENT_FOLDERS:
        folder = root / name
        if not (folder / "config.json").exists():
            continue
        configs[name] = json.loads((folder / "config.json").read_text())
        parts[name] = _ComponentWeights(folder)
    if not parts:
        raise WorkbenchError(f"{root}: a diffusers folder without unet/, vae/ or text_encoder/ weights")
    family = _family(root, configs)
    plan = diffusers_to_ldm_plan({n: p.infos.keys() for n, p in parts.items()}, family, configs)
    infos = {key: _info_of_source(src, parts) for key, src in plan.items()}

    def load(key: str) -> torch.Tensor:
        return build_ldm_tensor(plan[key], lambda component, k: parts[component].tensor(k))

    metadata = {"wb.source_format": "diffusers", "wb.diffusers_family": family}
    return Checkpoint(root, "diffusers", infos, load, metadata)
