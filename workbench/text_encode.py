"""Text encoding shared by sampling (grids) and training: A1111's clip skip.

A1111's "Clip skip" counts from the end of the CLIP text encoder: 1 is the last layer's output
(the normal output, already through the final layer norm), 2 is the penultimate layer's hidden
state passed through the final layer norm, and so on (modules/sd_hijack_clip.py). diffusers'
`clip_skip` counts one less (its 1 is A1111's 2).
"""

from __future__ import annotations


def encode_with_clip_skip(text_encoder, input_ids, clip_skip: int):
    """Token embeddings of `input_ids` from a transformers CLIPTextModel, with A1111's clip skip.

    clip_skip 1 (or less) is the last hidden state; n > 1 is hidden_states[-n] through the text
    model's final_layer_norm."""
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    inner = getattr(text_encoder, "module", text_encoder)  # (DDP's wrapper, several processes)
    layers = inner.config.num_hidden_layers
    if clip_skip > layers:
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"clip skip {clip_skip}: the text encoder has only {layers} layers")
    out = text_encoder(input_ids, output_hidden_states=True)
    model = getattr(inner, "text_model", inner)  # transformers 5 dropped the .text_model level
    return model.final_layer_norm(out.hidden_states[-clip_skip])
