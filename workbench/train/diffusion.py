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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError


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
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example loss (shape [B]): MSE between the prediction and the target (noise or v).

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
        hidden = models.text_encoder(input_ids)[0]
        pred = models.unet(noisy, timesteps, hidden).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas / (1 - alphas)
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_prediction else snr)
    return loss
