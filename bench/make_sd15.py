"""Write an SD1.5-size fp16 checkpoint with the real key names and shapes and random values.

    python bench/make_sd15.py OUT.safetensors [--seed N]

~2.1 GB, like `v1-5-pruned-emaonly-fp16.safetensors`: UNet, VAE and CLIP-L text encoder in the
single-file (LDM) layout, int64 position_ids and the fp32 noise-schedule buffers the original
files carry. Keys and shapes come from the shipped SD1.5 configs through wb's own converter, so
no download is needed. Values are N(0, 0.02): good for timing merges and reads, not for pictures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from workbench.checkpoint.convert import diffusers_to_ldm_plan, planned_shape_dtype
from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, dtype_names
from workbench.configs import load_config
from workbench.pipeline import _empty_module

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


def sd15_plan() -> dict[str, TensorInfo]:
    configs = {c: load_config("sd15", c) for c in ("unet", "vae", "text_encoder")}
    shapes = {}
    for name, cfg in configs.items():
        module = _empty_module(name, cfg)  # meta parameters: nothing allocated
        shapes[name] = {k: (tuple(v.shape), torch.float16) for k, v in module.state_dict().items()}
    plan = diffusers_to_ldm_plan({n: s.keys() for n, s in shapes.items()}, "sd1", configs)
    infos = {}
    for key, src in plan.items():
        shape, dtype = planned_shape_dtype(src, lambda c, k: shapes[c][k])
        infos[key] = TensorInfo(dtype_names()[dtype], tuple(shape))
    for key in SCHEDULE_BUFFERS:
        infos[key] = TensorInfo("F32", (1000,))
    return infos


def write_sd15(out: Path, seed: int = 0) -> Path:
    plan = sd15_plan()
    g = torch.Generator().manual_seed(seed)
    meta = {
        "format": "pt",
        "wb.made_by": f"bench/make_sd15.py --seed {seed}",
        "modelspec.title": "random SD1.5",
    }
    with SafetensorsWriter(out, plan, meta) as w:
        for key, info in plan.items():
            if info.dtype == "I64":
                w.write(key, torch.arange(info.shape[-1], dtype=torch.int64).reshape(info.shape))
            else:
                t = torch.randn(info.shape, generator=g, dtype=torch.float32).mul_(0.02)
                w.write(key, t.to(info.torch_dtype))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t = time.perf_counter()
    write_sd15(args.out, args.seed)
    size = args.out.stat().st_size
    print(
        f"wrote {args.out}: {size / 1e9:.2f} GB, {len(sd15_plan())} keys in {time.perf_counter() - t:.1f} s"
    )


if __name__ == "__main__":
    main()
