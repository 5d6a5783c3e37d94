"""The pieces of a Stable Diffusion training step shared by the loop and validation.

On VAE latents: encode the image, add noise at timestep t with the DDPM schedule of the model,
predict from the noisy latent and the caption, MSE against the model's target: the noise for
epsilon-prediction models (SD1.x, SD2 base), the velocity v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0
for v-prediction models (SD2 768-v). All random
numbers come from explicit CPU torch.Generators (then moved to the device), so a seed means the
same numbers on every device, and validation can use its own generator that training never touches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.text_encode import encode_with_clip_skip


@dataclass
class Models:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # diffusers DDPMScheduler with the model's beta schedule
    scaling_factor: float
    text_encoder_2: torch.nn.Module | None = None  # SDXL's OpenCLIP-bigG (see sdxl.py)
    tokenizer_2: object = None
    clip_skip: int = 1  # the conditioning: A1111 units (see workbench.text_encode); SD1/SD2 only


def noise_scheduler_for(config: dict):
    """A DDPMScheduler with the beta schedule and prediction type of the model's (inference)
    scheduler config."""
    from diffusers import DDPMScheduler

    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise WorkbenchError(f"model: {prediction} models cannot be trained (epsilon or v_prediction)")
    return DDPMScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        prediction_type=prediction,
    )


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def tokenize_for(models: Models, captions: list[str], device) -> torch.Tensor:
    """Token ids for the model: [B, 77], or [B, 2, 77] for SDXL's two text encoders."""
    if models.text_encoder_2 is not None:
        from workbench.train.sdxl import tokenize_pair

        return tokenize_pair(models.tokenizer, models.tokenizer_2, captions, device)
    return tokenize(models.tokenizer, captions, device)


def encode_latents(
    vae,
    pixels: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | None = None,
    eps=None,
    fp32: bool = False,
) -> torch.Tensor:
    """A sample of the VAE's latent distribution (as SD training does): mean + std * eps, with eps
    drawn from `generator` or given (validation draws it per example)."""
    # fp32 (SDXL's VAE overflows in fp16): the encoder runs in float32, outside any autocast
    with torch.autocast(pixels.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        dtype = torch.float32 if fp32 else next(vae.parameters()).dtype
        dist = vae.encode(pixels.to(dtype=dtype)).latent_dist
    if eps is None:
        eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
    latents = dist.mean.float() + dist.std.float() * eps.to(dist.mean.device, torch.float32)
    return latents * scaling_factor  # float32 even under autocast: the loss target must not be rounded


def denoising_loss(
    models: Models,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
    loss_type: str = "mse",
    huber: tuple[float, str, float] = (0.1, "snr", 1.0),
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example loss (shape [B]): MSE between the prediction and the target (noise or v).

    `loss_type` huber: Huber with delta 1 instead (F.huber_loss); mse_huber (EveryDream2's
    default): each element's MSE weighted by t / 1000 plus its Huber by 1 - t / 1000, t the example's
    timestep (Huber where the noise is small); huber_mse: the weights the other way round.
    pseudo_huber / smooth_l1 (kohya's "huber" / "smooth_l1"): 2c (sqrt(d^2 + c^2) - c) and
    2 (sqrt(d^2 + c^2) - c), c per example from `huber` = (huber_c, schedule, scale): snr:
    (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - a_t) / a_t); exponential:
    scale exp(ln(huber_c) t / T); constant: huber_c x scale.

    With min_snr_gamma, each example is weighted by min(SNR(t), gamma) / SNR(t) for epsilon
    prediction and min(SNR(t), gamma) / (SNR(t) + 1) for v prediction (Min-SNR: the same weight
    on the implied x0 error), which stops the low-noise timesteps from dominating.
    """
    scheduler = models.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    if models.text_encoder_2 is not None:  # SDXL: two encoders, pooled embedding, time ids
        from workbench.train.sdxl import unet_inputs

        hidden, added = unet_inputs(models, input_ids, time_ids)
        pred = models.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
    else:
        hidden = encode_with_clip_skip(models.text_encoder, input_ids, models.clip_skip)
        pred = models.unet(noisy, timesteps, hidden).sample
    loss = elementwise_loss(pred.float(), target.float(), timesteps, loss_type, scheduler, huber)
    loss = loss.mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas / (1 - alphas)
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_prediction else snr)
    return loss


def elementwise_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    loss_type: str,
    scheduler,
    huber: tuple[float, str, float] = (0.1, "snr", 1.0),
) -> torch.Tensor:
    """The loss of every element (same shape as pred); see denoising_loss for the types."""
    mse = F.mse_loss(pred, target, reduction="none")
    if loss_type == "mse":
        return mse
    if loss_type in ("pseudo_huber", "smooth_l1"):
        c = huber_threshold(timesteps, scheduler, *huber).to(pred.device).view(-1, 1, 1, 1)
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "pseudo_huber" else 2 * root
    huber = F.huber_loss(pred, target, reduction="none", delta=1.0)
    if loss_type == "huber":
        return huber
    w = (timesteps.float() / scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
    if loss_type == "mse_huber":
        return mse * w + huber * (1 - w)
    if loss_type == "huber_mse":
        return huber * w + mse * (1 - w)
    raise ValueError(f"unknown loss type {loss_type!r}")


def huber_threshold(
    timesteps: torch.Tensor, scheduler, huber_c: float, schedule: str, scale: float
) -> torch.Tensor:
    """kohya's per-example c for pseudo_huber / smooth_l1 (see denoising_loss)."""
    t = timesteps.cpu()
    if schedule == "snr":
        alphas = scheduler.alphas_cumprod.index_select(0, t).float()
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t.float()) * scale
    return torch.full((t.shape[0],), huber_c * scale)
