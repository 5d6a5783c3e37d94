"""Initial noise as A1111 draws it: the seed's noise, bent toward a variation seed's noise.

A1111 (modules/rng.py) draws each image's noise from its seed; with a variation seed and a strength
s > 0 it draws a second noise from the variation seed and interpolates spherically, on the latent
WITHOUT its batch dimension (channels, height, width), normalising along dim 1 (the height) as its
code does. When the two noises are nearly parallel (mean cosine > 0.9995) it mixes linearly, with
the weights the other way round (noise * s + variation * (1 - s)); wb keeps that too, so the noise
is A1111's bit for bit.
"""

from __future__ import annotations


def variation_slerp(strength: float, noise, variation):
    """A1111's slerp(strength, noise, variation_noise) for one (C, H, W) latent."""
    import torch

    low = noise / torch.norm(noise, dim=1, keepdim=True)
    high = variation / torch.norm(variation, dim=1, keepdim=True)
    dot = (low * high).sum(1)
    if dot.mean() > 0.9995:
        return noise * strength + variation * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * noise + (
        torch.sin(strength * omega) / so
    ).unsqueeze(1) * variation


def cell_noise(shape, seed_generator, subseed: int, strength: float, device):
    """One cell's initial latent (1, C, H, W): from its seed's generator, varied by `subseed`."""
    import torch

    noise = torch.randn(shape, generator=seed_generator, device=seed_generator.device)
    if strength == 0:
        return noise[None]
    sub = torch.Generator(device=seed_generator.device).manual_seed(subseed)
    variation = torch.randn(shape, generator=sub, device=seed_generator.device)
    return variation_slerp(strength, noise, variation)[None]
