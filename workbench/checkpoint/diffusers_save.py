"""Write a model as a diffusers folder (what `StableDiffusionPipeline.from_pretrained` loads).

    NAME/model_index.json
    NAME/unet/config.json          + diffusion_pytorch_model.safetensors
    NAME/vae/config.json           + diffusion_pytorch_model.safetensors
    NAME/text_encoder/config.json  + model.safetensors
    NAME/tokenizer/                (vocab.json, merges.txt, ...)
    NAME/scheduler/scheduler_config.json

Weights are cast tensor by tensor (never a second copy of a whole model) and written through
wb's safetensors writer. The folder is built as `.NAME.partial` beside NAME and renamed into place,
so a crash leaves no half folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from workbench.checkpoint.safetensors_io import save_tensors
from workbench.errors import WorkbenchError

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline"}


def save_diffusers_folder(
    path: str | os.PathLike,
    modules: dict[str, torch.nn.Module],
    tokenizer,
    scheduler_config: dict,
    layout: str = "sd1",
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
    weights: bool = True,
) -> Path:
    """`modules`: "unet", "vae", "text_encoder" (diffusers / transformers modules). `weights=False`
    writes the configs only: what `from_single_file(config=FOLDER)` needs to build a pipeline offline."""
    import diffusers

    path = Path(path)
    if path.exists():
        raise WorkbenchError(f"{path}: already exists; not overwriting it")
    if layout not in PIPELINES:
        raise WorkbenchError(f"{path}: writing {layout} models as diffusers folders is not supported")
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        index: dict = {"_class_name": PIPELINES[layout], "_diffusers_version": diffusers.__version__}
        for name, module in modules.items():
            folder = partial / name
            folder.mkdir()
            tensors = {
                k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
                for k, v in (module.state_dict().items() if weights else ())
            }
            if hasattr(module, "save_config"):  # a diffusers model
                module.save_config(folder)
                file = "diffusion_pytorch_model.safetensors"
                index[name] = ["diffusers", type(module).__name__]
            else:  # a transformers model
                module.config.architectures = [type(module).__name__]
                module.config.save_pretrained(folder)
                file = "model.safetensors"
                index[name] = ["transformers", type(module).__name__]
            if weights:
                save_tensors(folder / file, tensors, {"format": "pt"})
        tokenizer.save_pretrained(partial / "tokenizer")
        index["tokenizer"] = ["transformers", type(tokenizer).__name__]
        (partial / "scheduler").mkdir()
        scheduler = {k: v for k, v in scheduler_config.items() if k != "_diffusers_version"}
        (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index["scheduler"] = ["diffusers", scheduler.get("_class_name", "PNDMScheduler")]
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
        index["requires_safety_checker"] = False
        if metadata:  # what the single file keeps in its header (wb.train, wb.made_by ...)
            index["_wb_metadata"] = metadata
        (partial / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path
