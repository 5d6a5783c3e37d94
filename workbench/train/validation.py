"""Deterministic validation loss: the same weights give the same number, every time.

Training loss jumps around because every step draws new timesteps and noise; comparing two
checkpoints (or two learning rates) by it needs far more samples than a validation set has. So
validation fixes everything that is random:
- every example is evaluated at every timestep of a fixed grid (kohya uses 200/400/600/800), all
  timesteps of `batch_size` examples in one forward pass (no gradients are kept, so this fits
  wherever a training batch does; lower validation.batch_size if it does not);
- its VAE latent sample and its noise for each timestep come from its own torch.Generator, seeded
  by (validation seed, the example's position in the split), created afresh at every evaluation:
  training's random state is never read or advanced, and the validation batch size does not matter;
- no augmentation, no caption dropout, no shuffling, models in eval mode.
The result is the mean loss over examples x timesteps.
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.train.data import CaptionedImages, collate
from workbench.train.diffusion import Models, denoising_loss, encode_latents, tokenize_for


def example_noise(seed: int, index: int, shape: tuple[int, ...], n_timesteps: int) -> torch.Tensor:
    """(1 + n_timesteps, *shape) standard normal draws for one example: the latent sample's eps,
    then the noise for each timestep of the grid."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    g = torch.Generator().manual_seed(state)
    return torch.randn((1 + n_timesteps, *shape), generator=g)


@torch.no_grad()
def validation_loss(
    models: Models,
    dataset: CaptionedImages,
    timesteps: list[int],
    seed: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast=None,
) -> float:
    """Mean epsilon loss of `dataset` (unaugmented) over the timestep grid."""
    nets = (models.unet, models.text_encoder, models.text_encoder_2)
    modes = {m: m.training for m in nets if m is not None}
    for m in modes:
        m.eval()
    total, count = 0.0, 0
    try:
        for indices in _batches(dataset.sizes, batch_size):
            batch = collate([dataset[i] for i in indices])
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                pixels = batch["pixels"].to(device)
                shape = _latent_shape(models, pixels)
                draws = torch.stack([example_noise(seed, i, shape, len(timesteps)) for i in indices])
                latents = encode_latents(models.vae, pixels, models.scaling_factor, eps=draws[:, 0],
                                         fp32=models.text_encoder_2 is not None)  # fmt: skip
                # One forward for all (example, timestep) rows: example-major, like `draws`.
                n_t = len(timesteps)
                rows = latents.repeat_interleave(n_t, dim=0)
                noise = draws[:, 1:].reshape(-1, *shape).to(device, latents.dtype)
                ts = torch.tensor(timesteps, dtype=torch.long).repeat(len(indices)).to(device)
                ids = tokenize_for(models, batch["caption"], device).repeat_interleave(n_t, dim=0)
                sizes = batch["time_ids"].repeat_interleave(n_t, dim=0)
                loss = denoising_loss(models, rows, ids, noise, ts, time_ids=sizes)
                total += float(loss.double().sum())
                count += loss.numel()
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return total / max(1, count)


def _batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Consecutive indices of one image size (aspect buckets), at most batch_size at a time. Which
    examples share a batch does not change the result: each has its own noise."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    return [ids[i : i + batch_size] for ids in by_size.values() for i in range(0, len(ids), batch_size)]


def _latent_shape(models: Models, pixels: torch.Tensor) -> tuple[int, ...]:
    cfg = models.vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    return (cfg.latent_channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor)
