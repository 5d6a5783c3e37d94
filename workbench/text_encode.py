"""Text conditioning with "clip skip", shared by training and generation.

`clip_skip` is in AUTOMATIC1111 units (its "Clip skip" setting): 1 (or 0) is the text model's normal
output, the last layer's hidden state after the final layer norm; 2 is the penultimate layer's
hidden state passed through that same final_layer_norm; n the n-th from the end. EveryDream2's
`clip_skip` is the same number (it takes hidden_states[-clip_skip] through final_layer_norm when it
is above 0, so its 1 is also the normal output).
"""

from __future__ import annotations

import torch


def encode_with_clip_skip(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The conditioning (batch, tokens, width) of a HF CLIPTextModel for `input_ids`."""
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, then one per layer
    if clip_skip >= len(hidden):
        raise ValueError(f"clip_skip {clip_skip}: the text encoder has only {len(hidden) - 1} layers")
    text_model = getattr(text_encoder, "text_model", text_encoder)
    return text_model.final_layer_norm(hidden[-clip_skip])
