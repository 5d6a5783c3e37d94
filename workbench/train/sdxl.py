"""SDXL's conditioning for training: two text encoders, the pooled embedding, and `add_time_ids`.

As SDXL was trained (and as diffusers' StableDiffusionXLPipeline samples):
- the UNet's cross-attention input is the concatenation, along the feature axis, of the
  penultimate hidden states of CLIP-L (TE1) and OpenCLIP-bigG (TE2);
- the added embedding gets TE2's pooled, projected output (`text_embeds`) and six "time ids" per
  example: original height and width of the image, the top/left of the crop taken from the image
  after resizing, and the target height and width (the bucket the example trains at).

The ids of a batch are one tensor [B, 2, 77] (TE1's then TE2's tokens per example), so everything
that repeats or slices rows of SD1 ids (validation's timestep grid) works unchanged.
"""

from __future__ import annotations

import torch


def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's six size conditions, from (width, height) sizes and a (left, top) crop:
    [original_h, original_w, crop_top, crop_left, target_h, target_w] (float32)."""
    (ow, oh), (left, top), (tw, th) = original, crop, target
    return torch.tensor([oh, ow, top, left, th, tw], dtype=torch.float32)


def cover_crop(
    original: tuple[int, int], target: tuple[int, int], crop: tuple[float, float] | None = None
) -> tuple[int, int]:
    """(left, top) of the crop `data.load_image` takes after resizing an image of `original`
    (width, height) to cover `target`: the center crop, or `crop` (data.random_crop's placement);
    the same arithmetic, without reading pixels."""
    (w, h), (width, height) = original, target
    scale = max(width / w, height / h)
    if scale != 1:
        w, h = max(width, round(w * scale)), max(height, round(h * scale))
    if crop is not None:
        return int((w - width + 1) * crop[0]), int((h - height + 1) * crop[1])
    return (w - width) // 2, (h - height) // 2


def tokenize_pair(tokenizer, tokenizer_2, captions: list[str], device) -> torch.Tensor:
    """[B, 2, 77] token ids: each caption through TE1's and TE2's tokenizer (they pad differently)."""

    def ids(tok) -> torch.Tensor:
        return tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return torch.stack([ids(tokenizer), ids(tokenizer_2)], dim=1).to(device)


def encode_prompt(text_encoder, text_encoder_2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings [B, 77, d1 + d2], pooled TE2 embedding [B, projection_dim])."""
    out1 = text_encoder(ids[:, 0], output_hidden_states=True)
    out2 = text_encoder_2(ids[:, 1], output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return hidden, out2.text_embeds


def unet_inputs(models, ids: torch.Tensor, size_ids: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """What the UNet takes besides the noisy latents and timesteps: the encoder hidden states and
    `added_cond_kwargs`. Without size ids (none were given) the target is assumed square and uncropped
    at the latent size, which the caller must not rely on for training."""
    hidden, pooled = encode_prompt(models.text_encoder, models.text_encoder_2, ids)
    if size_ids is None:
        raise ValueError("SDXL training needs the batch's time ids (original size, crop, target size)")
    added = {"text_embeds": pooled, "time_ids": size_ids.to(pooled.device, pooled.dtype)}
    return hidden, added
