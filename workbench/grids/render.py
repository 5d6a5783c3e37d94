"""Render a plan's cells with ONE pipeline: weights swapped in place per checkpoint, cells batched.

The pipeline is built from the first checkpoint; every later checkpoint is loaded into the same
modules with `load_weights_into`, which skips components whose tensors are unchanged (a grid of
fine-tunes that share a VAE reloads only the UNet). A checkpoint whose model configs differ (an SDXL
file in a grid of SD1.5 ones) gets a new pipeline instead, since its modules have other shapes.

Determinism: each cell owns a torch.Generator seeded with its seed; its initial latent is drawn
from it and the same generator is passed (in a list, one per image) to the pipeline, so ancestral
samplers draw each image's per-step noise from that image's own stream. A cell's noise therefore
does not depend on the batch it lands in, or on the order of the cells.

Same noise is not yet same pixels: CPU kernels pick their algorithm by shape, so a sample's float
results can change in the last bits with the batch around it, and a few 8-bit pixels flip. Three
measures make a cell's pixels exactly independent of the batch on CPU (tests check it):
  * prompts are encoded one at a time (and cached per text encoder), and latents decoded one at a
    time: those models always see a batch of one;
  * in the UNet, 2-D linear layers (the timestep embedding path, whose rows are the batch) are
    computed row by row: a small-M GEMM's rounding depends on M; the other linears see
    batch x tokens rows, large enough for the kernel not to change;
  * the UNet never runs on a batch of one (oneDNN convolutions take another algorithm for N=1):
    with guidance the batch is already 2 per cell; a lone cell at CFG 1 is sampled twice.
On CUDA, cuDNN/cuBLAS choose algorithms by batch size too and nothing here pins them: there, a
cell's noise is batch-independent and its pixels are the same up to rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from PIL import Image

from workbench.errors import WorkbenchError
from workbench.grids.lora_apply import LoraState, strip_tags
from workbench.grids.noise import cell_noise
from workbench.grids.plan import Cell, Plan
from workbench.grids.samplers import make_scheduler, resolve, resolve_schedule

# progress(images done, images in total, what is happening)
Progress = Callable[[int, int, str], None]


@dataclass
class RenderResult:
    images: dict[int, Image.Image]  # cell index -> image
    device: str
    dtype: str
    sampling_seconds: float  # encoding, denoising and decoding: the floor any grid tool pays
    sampling_cpu_seconds: float  # the same in process CPU time (steadier than wall time on a busy machine)
    loading_seconds: float  # building the pipeline and swapping weights
    total_seconds: float
    reloaded: dict[str, list[str]] = field(default_factory=dict)  # checkpoint -> components loaded
    pipelines_built: int = 0


def pick_device() -> tuple[str, object]:
    """cuda + fp16 when a GPU is there, else CPU + fp32 (fp16 on CPU is slow and lossy)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def configs_and_scheduler(path: Path) -> tuple[dict, dict]:
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.pipeline import model_spec

    spec = model_spec(open_checkpoint(path))
    configs = dict(spec.configs)
    scheduler = configs.pop("scheduler")
    return {"layout": spec.layout, **configs}, scheduler


def initial_latents(cells: list[Cell], generators: list, channels: int, scale: int, dtype, device):
    """One latent per cell, each drawn from the cell's own generator (batch-size independent).

    `scale` is the VAE's downsampling factor: 8 for SD, 2 for the toy model.
    """
    import torch

    latents = [
        cell_noise((channels, c.height // scale, c.width // scale), g, c.subseed, c.subseed_strength, device)
        for c, g in zip(cells, generators, strict=True)
    ]
    # Drawn in float32 then cast, so fp16 and fp32 runs start from the same noise.
    return torch.cat(latents).to(device=device, dtype=dtype)


def _rowwise_linear(module, args, output):
    """Forward hook: recompute a 2-D linear one row at a time, so no row depends on the batch size."""
    import torch
    import torch.nn.functional as F

    x = args[0]
    if x.dim() != 2 or x.shape[0] < 2:
        return None  # keep the module's own output
    return torch.cat([F.linear(x[i : i + 1], module.weight, module.bias) for i in range(x.shape[0])])


def make_batch_invariant(unet) -> None:
    """Hook every linear of the UNet (once; the hooks survive weight swaps, which copy in place)."""
    import torch

    if getattr(unet, "_wb_batch_invariant", False):
        return
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(_rowwise_linear)
    unet._wb_batch_invariant = True


class PromptCache:
    """Text embeddings per prompt, encoded one prompt at a time, kept while the text encoder is unchanged."""

    def __init__(self, pipe, device: str, layout: str = "sd1") -> None:
        self.pipe, self.device, self.layout = pipe, device, layout
        self.sdxl = hasattr(pipe, "text_encoder_2")
        self.cache: dict[tuple[str, bool, int], tuple] = {}

    def clear(self) -> None:
        self.cache.clear()

    def get(self, text: str, negative: bool = False, clip_skip: int = 1) -> tuple:
        """(embeddings, pooled embeddings or None) for one text, each with a batch of one."""
        key = (text, negative, clip_skip)
        if key not in self.cache:
            import torch

            if clip_skip > 1:
                if self.layout != "sd1":
                    raise WorkbenchError(
                        f"--clip-skip {clip_skip}: A1111 applies clip skip to SD1 text encoders only; "
                        f"this checkpoint is {self.layout}"
                    )
                from workbench.text_encode import encode_with_clip_skip

                tok = self.pipe.tokenizer
                ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids  # fmt: skip
                embeds = encode_with_clip_skip(self.pipe.text_encoder, ids.to(self.device), clip_skip)
                self.cache[key] = (embeds.to(self.pipe.text_encoder.dtype), None)
                return self.cache[key]
            if self.sdxl:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=text,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )
                # SDXL's empty negative prompt is zeros, not the encoding of "" (diffusers' default).
                if negative and not text and self.pipe.config.force_zeros_for_empty_prompt:
                    embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                embeds, _ = self.pipe.encode_prompt(
                    prompt=text,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )
                pooled = None
            self.cache[key] = (embeds, pooled)
        return self.cache[key]

    def batch(self, cells: list[Cell]) -> dict:
        """The pipeline's embedding arguments for these cells."""
        import torch

        # <lora:...> tags are applied to the weights, not encoded (A1111 removes them from the text)
        pos = [self.get(strip_tags(c.prompt), clip_skip=c.clip_skip) for c in cells]
        neg = [self.get(c.negative, negative=True, clip_skip=c.clip_skip) for c in cells]
        kwargs = {
            "prompt_embeds": torch.cat([e for e, _ in pos]),
            "negative_prompt_embeds": torch.cat([e for e, _ in neg]),
        }
        if self.sdxl:
            kwargs["pooled_prompt_embeds"] = torch.cat([p for _, p in pos])
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([p for _, p in neg])
        return kwargs


def decode_latents(pipe, latents) -> list[Image.Image]:
    """Decode one latent at a time (see the module docstring), as the diffusers pipelines decode."""
    import torch

    vae = pipe.vae
    # SDXL's VAE overflows in fp16; its pipeline decodes in fp32, and so do we.
    upcast = hasattr(pipe, "upcast_vae") and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    images = []
    for latent in latents.split(1):
        latent = latent.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latent)
            std_t = torch.tensor(std).view(shape).to(latent)
            latent = latent * std_t / vae.config.scaling_factor + mean_t
        else:
            latent = latent / vae.config.scaling_factor
        decoded = vae.decode(latent, return_dict=False)[0]
        images.extend(pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True]))
    if upcast:
        vae.to(torch.float16)
    return images


_GUIDED: dict[type, type] = {}


def a1111_guidance(pipe) -> None:
    """Make the pipeline guide as A1111 does: uncond + cfg * (cond - uncond) for every CFG >= 0.

    diffusers turns guidance off at CFG <= 1 (it samples the prompt alone); A1111 does not, so CFG
    0 is the negative prompt alone and 0.5 lies between. Only CFG 1 skips the unconditional pass,
    where the formula gives the prompt's prediction anyway. The pipeline's class is swapped for a
    subclass whose `do_classifier_free_guidance` says so; everything else is diffusers' own loop."""
    cls = type(pipe)
    if cls in _GUIDED.values():
        return
    if cls not in _GUIDED:
        _GUIDED[cls] = type(
            f"A1111Guided{cls.__name__}",
            (cls,),
            {"do_classifier_free_guidance": property(lambda self: self._guidance_scale != 1)},
        )
    pipe.__class__ = _GUIDED[cls]


def denoise(pipe, cells: list[Cell], scheduler_config: dict, device: str, dtype, prompts: PromptCache):
    """The final latents of cells that share steps, CFG, sampler and size: one pipeline call."""
    import torch

    first = cells[0]
    schedule = resolve_schedule(first.scheduler)
    pipe.scheduler = make_scheduler(resolve(first.sampler), scheduler_config, schedule)
    make_batch_invariant(pipe.unet)
    a1111_guidance(pipe)
    # Guidance runs for every CFG but 1 (the UNet then sees 2 samples per cell); a lone cell at CFG 1
    # is run twice so the UNet never sees a batch of one.
    run = cells * 2 if len(cells) == 1 and first.cfg == 1 else cells
    generators = [torch.Generator(device=device).manual_seed(c.seed) for c in run]
    channels, scale = pipe.unet.config.in_channels, pipe.vae_scale_factor
    latents = initial_latents(run, generators, channels, scale, dtype, device)
    out = pipe(
        **prompts.batch(run),
        num_inference_steps=first.steps,
        guidance_scale=first.cfg,
        height=first.height,
        width=first.width,
        generator=generators,
        latents=latents,
        output_type="latent",
    )
    return out.images[: len(cells)]


def sample_batch(
    pipe, cells: list[Cell], scheduler_config: dict, device: str, dtype, prompts: PromptCache
) -> list[Image.Image]:
    """Sample cells that share steps, CFG, sampler and size: one pipeline call, then decode each."""
    return decode_latents(pipe, denoise(pipe, cells, scheduler_config, device, dtype, prompts))


def render_cells(
    plan: Plan,
    batch: int = 4,
    device: str | None = None,
    dtype=None,
    progress: Progress | None = None,
    on_image: Callable[[Cell, Image.Image], None] | None = None,
) -> RenderResult:
    """Render every cell of `plan`; `on_image` sees each image as soon as it exists."""
    import torch

    from workbench.pipeline import build_pipeline, load_vae_into, load_weights_into

    if device is None:
        device, dtype = pick_device()
    dtype = dtype or torch.float32
    start = time.perf_counter()
    sampling = sampling_cpu = loading = 0.0
    images: dict[int, Image.Image] = {}
    reloaded: dict[str, list[str]] = {}
    total = len(plan.cells)
    pipe, pipe_configs, built, prompts, loras = None, None, 0, None, None
    report = progress or (lambda done, total, note: None)

    for ckpt, group in groupby(plan.render_order(), key=lambda c: c.checkpoint):
        cells = list(group)
        name = cells[0].checkpoint_name
        report(len(images), total, f"loading {name}")
        t0 = time.perf_counter()
        configs, scheduler_config = configs_and_scheduler(ckpt)
        if pipe is None or configs != pipe_configs:
            pipe = build_pipeline(ckpt, dtype=dtype, device=device)
            pipe.set_progress_bar_config(disable=True)
            pipe_configs, built = configs, built + 1
            prompts = PromptCache(pipe, device, configs["layout"])
            loras = LoraState(pipe, ckpt)
            reloaded[str(ckpt)] = ["all (new pipeline)"]
        else:
            if loras.text_encoder_changed:
                prompts.clear()
            loras.use_checkpoint(ckpt)  # the originals back before the next checkpoint's weights
            reloaded[str(ckpt)] = load_weights_into(pipe, ckpt)
            if any(name.startswith("text_encoder") for name in reloaded[str(ckpt)]):
                prompts.clear()
        vae_now = None  # the checkpoint's own VAE is in the pipeline
        loading += time.perf_counter() - t0

        for vae, same_vae in groupby(cells, key=lambda c: c.vae):
            if vae != vae_now:
                t0 = time.perf_counter()
                if vae is None:
                    load_weights_into(pipe, ckpt, components=("vae",))
                else:
                    load_vae_into(pipe, vae, configs["layout"])
                    reloaded[str(ckpt)].append(f"vae from {vae}")
                vae_now = vae
                loading += time.perf_counter() - t0
            for _, same in groupby(same_vae, key=Cell.batch_key):
                same = list(same)
                t0 = time.perf_counter()
                if loras.apply(same[0].loras):  # in place; the text encoders changed: re-encode prompts
                    prompts.clear()
                loading += time.perf_counter() - t0
                for i in range(0, len(same), max(1, batch)):
                    chunk = same[i : i + max(1, batch)]
                    t0, c0 = time.perf_counter(), time.process_time()
                    with torch.inference_mode():
                        out = sample_batch(pipe, chunk, scheduler_config, device, dtype, prompts)
                    sampling += time.perf_counter() - t0
                    sampling_cpu += time.process_time() - c0
                    for cell, image in zip(chunk, out, strict=True):
                        images[cell.index] = image
                        if on_image:
                            on_image(cell, image)
                    report(len(images), total, name)

    return RenderResult(
        images=images,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        sampling_seconds=sampling,
        sampling_cpu_seconds=sampling_cpu,
        loading_seconds=loading,
        total_seconds=time.perf_counter() - start,
        reloaded=reloaded,
        pipelines_built=built,
    )
