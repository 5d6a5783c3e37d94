"""Diffusers / transformers model configs (JSON, no weights) for the architectures wb knows.

They let wb build a pipeline around a single-file checkpoint without asking the Hugging Face hub for
the model folder. Values are those of the public diffusers repos:

- ``sd15``: runwayml/stable-diffusion-v1-5
- ``sd21``: stabilityai/stable-diffusion-2-1 (768-v, ``v_prediction``). For stable-diffusion-2-1-base
  (512, ``epsilon``) the loader switches the scheduler's ``prediction_type`` to ``epsilon`` and, where it
  matters, uses ``sample_size`` 64 for the UNet and 512 for the VAE; the layers are the same.
- ``sdxl``: stabilityai/stable-diffusion-xl-base-1.0

Every file carries ``_class_name`` (the diffusers or transformers class to build). Diffusers'
``from_config`` ignores that key; for the text encoders pop it before ``CLIPTextConfig(**config)``.
Keys the current classes no longer accept (``skip_prk_steps`` on DDIM/Euler, ``dropout`` on CLIP text
configs, ``_diffusers_version``, ``torch_dtype``) were left out so that loading prints no warnings.
"""

import json
from importlib import resources

from workbench.errors import WorkbenchError

# Component names are the diffusers pipeline folder names, so a pipeline can be assembled by key.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "vae", "text_encoder", "scheduler"),
    "sd21": ("unet", "vae", "text_encoder", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
}


def load_config(arch: str, component: str) -> dict:
    """Return a fresh dict of the config of `component` (e.g. "unet") for `arch` (e.g. "sdxl")."""
    if arch not in ARCHITECTURES:
        raise WorkbenchError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if component not in ARCHITECTURES[arch]:
        raise WorkbenchError(
            f"architecture {arch!r} has no component {component!r}; it has: {', '.join(ARCHITECTURES[arch])}"
        )
    # A new dict on every call: callers edit configs (prediction_type, sample_size) before use.
    # joinpath one level at a time: several arguments need Python 3.11 and we support 3.10.
    path = resources.files(__name__).joinpath(arch).joinpath(f"{component}.json")
    return json.loads(path.read_text(encoding="utf-8"))
