"""Scores for grid cells: a burn score from pixels alone, and a CLIP score when CLIP weights are at hand.

Burn score (0-100, higher = more burnt). An over-trained or over-CFG'd image shows three things at
once: colours pushed to full saturation, channels slammed against 0 or 255, and harsh
high-frequency texture. With the image as RGB floats in [0, 1]:

    chroma   = mean over pixels of  max(R,G,B) - min(R,G,B)
    clipped  = fraction of channel values <= 2/255 or >= 253/255
    hf       = mean over pixels of  |Y - box3x3(Y)|,   Y = 0.299 R + 0.587 G + 0.114 B
    burn     = 100 * (0.4 * chroma + 0.4 * clipped + 0.2 * hf / (hf + 0.05))

Chroma (not HSV saturation, which jumps to 1 for any dark pixel with a little colour) and the
clipped fraction carry most of the weight because they move most under burning; the
high-frequency term is squashed by hf / (hf + 0.05) so a noisy but otherwise healthy image cannot
dominate. A value pushed to 0 or 255 stays there under further pushes, and chroma grows with a
saturation push; a contrast push can lower chroma in already bright or dark areas, but there it
clips values faster, which weighs as much. So the score rises monotonically along a burn until the
image stops changing (tests/test_grid_metrics.py checks this on shapes, gradients and flat colour).

CLIP score: 100 * max(0, cos(image embedding, text embedding)) with an open-clip model, the usual
definition (as torchmetrics computes it); higher = the image matches its prompt better.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from workbench.errors import WorkbenchError

CLIP_LOW = 2 / 255
CLIP_HIGH = 253 / 255
HF_HALF = 0.05  # the high-frequency energy at which that term is half way to its maximum
WEIGHTS = (0.4, 0.4, 0.2)  # chroma, clipped, high frequency


@dataclass
class BurnParts:
    chroma: float
    clipped: float
    high_freq: float
    score: float


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB float32 in [0, 1], (H, W, 3), from a PIL image or a uint8 / float array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _box3(plane: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication."""
    p = np.pad(plane, 1, mode="edge")
    h, w = plane.shape
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def burn_parts(image: Image.Image | np.ndarray) -> BurnParts:
    """The burn score and the three terms it is made of (see the module docstring)."""
    x = _pixels(image)
    hi, lo = x.max(axis=2), x.min(axis=2)
    chroma = float((hi - lo).mean())
    # Per channel value, not per pixel: a pure red pixel is already "clipped" in G and B, and a
    # per-pixel count jumps to 1 at the first push, leaving nothing to measure afterwards.
    clipped = float(((x <= CLIP_LOW) | (x >= CLIP_HIGH)).mean())
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    hf = float(np.abs(luma - _box3(luma)).mean())
    w_chroma, w_clipped, w_hf = WEIGHTS
    score = 100.0 * (w_chroma * chroma + w_clipped * clipped + w_hf * hf / (hf + HF_HALF))
    return BurnParts(chroma, clipped, hf, score)


def burn_score(image: Image.Image | np.ndarray) -> float:
    """0-100, higher = more burnt: chroma, clipped pixels and high-frequency energy (module docstring)."""
    return burn_parts(image).score


class ClipScorer:
    """Scores (image, prompt) pairs with an open-clip model: 100 * max(0, cosine similarity)."""

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu", name: str = "") -> None:
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.name = name

    def score(self, images: list[Image.Image], prompts: list[str], batch: int = 16) -> list[float]:
        import torch

        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(images), batch):
                chunk = images[start : start + batch]
                pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk]).to(self.device)
                tokens = self.tokenizer(prompts[start : start + batch]).to(self.device)
                img = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
                txt = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
                cos = (img * txt).sum(dim=-1).clamp(min=0)
                scores.extend((100.0 * cos).tolist())
        return scores


def load_clip_scorer(model_name: str, weights: str | os.PathLike, device: str = "cpu") -> ClipScorer:
    """An open-clip model from a LOCAL weights file (never downloads). WorkbenchError names the flag."""
    import open_clip

    path = Path(weights)
    if not path.is_file():
        raise WorkbenchError(f"--clip-weights {path}: no such file")
    if model_name not in open_clip.list_models():
        raise WorkbenchError(
            f"--clip-model {model_name!r}: unknown to open-clip; e.g. ViT-B-32, ViT-L-14, ViT-H-14"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), device=device, require_pretrained=True
        )
    except Exception as e:  # open-clip raises RuntimeError, AssertionError, KeyError, pickle errors...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkbenchError(f"--clip-weights {path}: does not load into {model_name}: {first}") from None
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(model_name), device, model_name)
