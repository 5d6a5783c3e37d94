"""Convert between the single-file "LDM" checkpoint layout and diffusers/transformers state dicts.

LDM -> diffusers goes through diffusers' own converters (`diffusers.loaders.single_file_utils`), so
wb reads a file exactly as `from_single_file` would. diffusers -> LDM is our own reverse mapping,
written as a *plan*: an ordered map of LDM key -> where its tensor comes from, computed from key
names and configs alone, so a lazy reader can present a diffusers folder in the LDM layout and read
tensors one at a time. `build_ldm_tensor` then makes one LDM tensor from its sources.

The reverse is exact: LDM -> diffusers -> LDM gives back the same keys, shapes, dtypes and bytes for
every key the plan produces. It cannot produce what a diffusers model does not hold: SD2's 24th
OpenCLIP resblock, SD2's `text_projection` and OpenCLIP's `logit_scale` (diffusers drops them on the
way in; A1111 and ComfyUI load SD2/SDXL files without them). It always writes the CLIP-L
`embeddings.position_ids` as int64 `arange(77)`, whatever the diffusers side had (see FORMATS.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

FAMILIES = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family keeps each text encoder in a single file, and which layout it has there:
# "clip" is HF CLIP-L's own key names under `text_model.`, "open_clip" is OpenCLIP's (fused qkv).
_TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
    },
}
COMPONENT_ORDER = ("unet", "vae", "text_encoder", "text_encoder_2")
# LDM files have always carried 77 positions; the int64 buffer is rebuilt rather than copied.
CLIP_POSITIONS = 77

OPS = ("copy", "to_conv1x1", "cat", "transpose", "arange77")


@dataclass(frozen=True)
class LdmSource:
    """Where one LDM tensor comes from: diffusers-side keys of one component and what to do to them.

    copy: the tensor as is. to_conv1x1: a Linear [C, C] weight as a 1x1 conv [C, C, 1, 1] (VAE
    mid-block attention). cat: q, k, v stacked along dim 0 (OpenCLIP `in_proj_*`). transpose: a
    Linear weight transposed (OpenCLIP `text_projection` is used as `x @ P`). arange77: the int64
    position_ids buffer, made from nothing (keys is empty).
    """

    component: str
    keys: tuple[str, ...]
    op: str


def ldm_prefixes(family: str) -> dict[str, str]:
    """component -> the key prefix it has in a single file of this family."""
    _check_family(family)
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    prefixes.update({name: prefix for name, (prefix, _) in _TEXT_ENCODERS[family].items()})
    return prefixes


# --------------------------------------------------------------------------------------------
# Old SD1 text-encoder keys
# --------------------------------------------------------------------------------------------

_OLD_SD1_TE = re.compile(r"cond_stage_model\.transformer\.(?=(embeddings|encoder|final_layer_norm)\.)")


def normalize_ldm_key(key: str) -> str:
    """The current spelling of an LDM key: very old SD1 files (transformers < 4.x saves) have the
    CLIP text model directly under `cond_stage_model.transformer.`; A1111 inserts `text_model.`."""
    if _OLD_SD1_TE.match(key):
        return "cond_stage_model.transformer.text_model." + key[len("cond_stage_model.transformer.") :]
    return key


def normalize_ldm_keys(keys: Iterable[str]) -> dict[str, str]:
    """normalized key -> key as stored, in the stored order. A file holding both spellings of one
    key is ambiguous and refused."""
    out: dict[str, str] = {}
    for key in keys:
        new = normalize_ldm_key(key)
        if new in out:
            raise WorkbenchError(f"both {out[new]!r} and {key!r} are in the checkpoint: which one is meant?")
        out[new] = key
    return out


# --------------------------------------------------------------------------------------------
# LDM -> diffusers (diffusers' converters)
# --------------------------------------------------------------------------------------------


def ldm_to_diffusers(
    ldm: Mapping[str, Tensor], family: str, configs: Mapping[str, Mapping]
) -> dict[str, dict[str, Tensor]]:
    """Split a single-file checkpoint into diffusers/transformers state dicts, one per component.

    Each returned state dict loads with `load_state_dict(strict=True)` into the model its config
    builds (checked here against that model built on the meta device: names and shapes). A
    component with no key in `ldm` is left out. Keys outside the model components (EMA copies,
    scheduler buffers, OpenCLIP's logit_scale, SD2's unused last resblock) are ignored. Tensors are
    shared with `ldm` where no reshaping is needed.
    """
    from diffusers.loaders import single_file_utils as sfu

    names = normalize_ldm_keys(ldm.keys())
    out: dict[str, dict[str, Tensor]] = {}
    for component, prefix in ldm_prefixes(family).items():
        keys = [key for key in names if key.startswith(prefix)]
        if not keys:
            continue
        config = _config(configs, component)
        model = _empty_model(component, config)
        open_clip = component.startswith("text_encoder") and _te_layout(family, component) == "open_clip"
        if open_clip:
            keys = _open_clip_inputs(keys, prefix, model)
        # Only this component's tensors are read: a lazy `ldm` never loads EMA or the other parts.
        part = {key: ldm[names[key]] for key in keys}
        if component == "unet":
            sd = sfu.convert_ldm_unet_checkpoint(part, _unet_converter_config(config))
        elif component == "vae":
            sd = sfu.convert_ldm_vae_checkpoint(part, config)
        elif open_clip:
            sd = sfu.convert_open_clip_checkpoint(model, part, prefix=prefix)
        else:
            sd = sfu.convert_ldm_clip_checkpoint(part, remove_prefix=prefix)
        if component.startswith("text_encoder"):
            sd = _fit_transformers_layout(sd, model)
        out[component] = _checked_against(component, sd, model)
    return out


def _open_clip_inputs(keys: list[str], prefix: str, model) -> list[str]:
    """Drop what the diffusers model has no place for before diffusers' converter sees it.

    The converter only knows to skip SD2-H's resblock 23 and text_projection by their full names;
    filtering by the config's layer count works for any depth (and keeps tiny test models honest).
    """
    layers = model.config.num_hidden_layers
    has_projection = "text_projection.weight" in model.state_dict()
    resblock = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    kept = []
    for key in keys:
        m = resblock.match(key)
        if m and int(m.group(1)) >= layers:
            continue
        if key == prefix + "logit_scale" or (key == prefix + "text_projection" and not has_projection):
            continue
        kept.append(key)
    return kept


def _fit_transformers_layout(sd: dict[str, Tensor], model) -> dict[str, Tensor]:
    """diffusers' CLIP converters emit `text_model.*`, the transformers-4 layout. Since transformers
    5.6, CLIPTextModel is flat (no `text_model.`) while CLIPTextModelWithProjection still nests it,
    so strip the prefix when the model has no such submodule (as diffusers' own loader does)."""
    if not hasattr(model, "text_model"):
        sd = {key.removeprefix("text_model."): value for key, value in sd.items()}
    expected = model.state_dict()
    # position_ids became a non-persistent buffer in transformers 4.31: drop it when not expected.
    return {k: v for k, v in sd.items() if k in expected or not k.endswith("embeddings.position_ids")}


def _checked_against(component: str, sd: dict[str, Tensor], model) -> dict[str, Tensor]:
    """The converted dict in the model's own key order, after checking names and shapes, so a wrong
    config or a partial file is reported here, by key, and not as a load_state_dict traceback."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in sd]
    if missing:
        raise WorkbenchError(
            f"{component}: the checkpoint has nothing for {missing[0]!r} ({len(missing)} keys missing); "
            "is the config for another model?"
        )
    unexpected = [key for key in sd if key not in expected]
    if unexpected:
        raise WorkbenchError(f"{component}: converted key {unexpected[0]!r} has no place in the model config")
    for key, want in expected.items():
        if tuple(sd[key].shape) != tuple(want.shape):
            raise WorkbenchError(
                f"{component}: {key!r} is {list(sd[key].shape)} in the checkpoint, "
                f"the config expects {list(want.shape)}"
            )
    return {key: sd[key] for key in expected}


def _empty_model(component: str, config: Mapping):
    """The model a config describes, on the meta device (no memory, no init cost)."""
    import torch

    with torch.device("meta"):
        return build_model(component, config)


def build_model(component: str, config: Mapping):
    """The diffusers/transformers module for one component ("unet", "vae", "text_encoder",
    "text_encoder_2") from its config dict, created on torch's current default device."""
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(dict(config))
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(dict(config))
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    projection = _te_class_name(component, config).endswith("Projection")
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig.from_dict(dict(config)))


def _te_class_name(component: str, config: Mapping) -> str:
    """The text encoder's class as its config names it; SDXL's second encoder has the projection."""
    names = [config.get("_class_name"), *(config.get("architectures") or [])]
    for name in names:
        if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            return name
    return "CLIPTextModelWithProjection" if component == "text_encoder_2" else "CLIPTextModel"


def _unet_converter_config(config: Mapping) -> dict:
    """diffusers' UNet converter does arithmetic on `layers_per_block`, so it must be one int."""
    config = dict(config)
    config["layers_per_block"] = _layers_per_block(config)
    return config


# --------------------------------------------------------------------------------------------
# diffusers -> LDM (our reverse mapping)
# --------------------------------------------------------------------------------------------


def diffusers_to_ldm_plan(
    component_keys: Mapping[str, Iterable[str]], family: str, configs: Mapping[str, Mapping]
) -> dict[str, LdmSource]:
    """Ordered LDM key -> LdmSource for the given diffusers components' keys. Needs no tensor data.

    Accepts CLIP keys with or without `text_model.` (transformers 4 vs 5 CLIPTextModel), the old
    diffusers VAE attention names (query/key/value/proj_attn) and a stored position_ids buffer
    (ignored: position_ids is always rebuilt as int64). Raises WorkbenchError naming the first key
    it cannot place.
    """
    prefixes = ldm_prefixes(family)
    for component, keys in component_keys.items():
        if component not in prefixes:
            first = next(iter(keys), "")
            raise WorkbenchError(
                f"{component}: no place for diffusers key {component}/{first} in an LDM {family} checkpoint"
            )
    plan: dict[str, LdmSource] = {}
    for component in COMPONENT_ORDER:
        if component not in component_keys:
            continue
        keys = list(component_keys[component])
        config = configs.get(component) or {}
        if component == "unet":
            entries = _unet_plan(keys, config)
        elif component == "vae":
            entries = _vae_plan(keys, config)
        elif _te_layout(family, component) == "clip":
            entries = _clip_plan(component, keys, config)
        else:
            entries = _open_clip_plan(component, keys)
        for ldm_key, source in entries.items():
            full = prefixes[component] + ldm_key
            if full in plan:
                raise WorkbenchError(f"{component}: two diffusers keys both map to {full!r}")
            plan[full] = source
    return plan


def build_ldm_tensor(src: LdmSource, get: Callable[[str, str], Tensor]) -> Tensor:
    """One LDM tensor from its sources; `get(component, key)` returns a diffusers tensor.
    Copies only where the layout demands it (cat, transpose); dtypes are kept."""
    import torch

    if src.op == "copy":
        return get(src.component, src.keys[0])
    if src.op == "to_conv1x1":
        weight = get(src.component, src.keys[0])
        return weight if weight.ndim == 4 else weight[:, :, None, None]  # a view, still contiguous
    if src.op == "cat":
        return torch.cat([get(src.component, key) for key in src.keys], dim=0)
    if src.op == "transpose":
        # contiguous: safetensors stores row-major data, and the LDM file holds P itself.
        return get(src.component, src.keys[0]).t().contiguous()
    if src.op == "arange77":
        return torch.arange(CLIP_POSITIONS, dtype=torch.int64)[None]
    raise WorkbenchError(f"unknown conversion op {src.op!r}")


def planned_shape_dtype(
    src: LdmSource, info: Callable[[str, str], tuple[tuple[int, ...], torch.dtype]]
) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the tensor `build_ldm_tensor` will make, from the sources' (shape, dtype)
    alone, so a header can be written before any data is read."""
    import torch

    if src.op == "arange77":
        return (1, CLIP_POSITIONS), torch.int64
    shapes_dtypes = [info(src.component, key) for key in src.keys]
    shape, dtype = tuple(shapes_dtypes[0][0]), shapes_dtypes[0][1]
    if src.op == "to_conv1x1" and len(shape) == 2:
        shape = (*shape, 1, 1)
    elif src.op == "cat":
        shape = (sum(s[0] for s, _ in shapes_dtypes), *shape[1:])
    elif src.op == "transpose":
        shape = shape[::-1]
    return shape, dtype


def diffusers_to_ldm(
    components: Mapping[str, Mapping[str, Tensor]], family: str, configs: Mapping[str, Mapping]
) -> dict[str, Tensor]:
    """diffusers/transformers state dicts -> one single-file (LDM) state dict."""
    plan = diffusers_to_ldm_plan({name: sd.keys() for name, sd in components.items()}, family, configs)
    return {key: build_ldm_tensor(src, lambda c, k: components[c][k]) for key, src in plan.items()}


# UNet ----------------------------------------------------------------------------------------

_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # class_embed_type timestep/projection
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# ResnetBlock2D -> LDM ResBlock: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU, Linear),
# out_layers = (GroupNorm, SiLU, Dropout, conv): the numbers are positions in those Sequentials.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _unet_plan(keys: list[str], config: Mapping) -> dict[str, LdmSource]:
    layers = _layers_per_block(config)
    # An up level's upsampler follows its resnet, and its attention when it has one (index 1 or 2).
    up_with_attention = {
        int(m.group(2))
        for key in keys
        if (m := _UNET_BLOCK.match(key)) and m.group(1) == "up" and m.group(3) == "attentions"
    }
    out = {}
    for key in keys:
        ldm_key = _unet_ldm_key(key, layers, up_with_attention)
        if ldm_key is None:
            raise WorkbenchError(f"unet: cannot place diffusers key {key!r} in the LDM layout")
        out[ldm_key] = LdmSource("unet", (key,), "copy")
    return out


def _unet_ldm_key(key: str, layers: int, up_with_attention: set[int]) -> str | None:
    module, _, param = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if m := _UNET_BLOCK.fullmatch(key):
        side, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            # input_blocks: 0 is conv_in, then per level `layers` (resnet, attention) pairs and
            # one downsampler slot, so a level spans layers + 1 blocks.
            block = 1 + level * (layers + 1) + index
            if kind == "resnets" and index < layers:
                return _resnet_key(f"input_blocks.{block}.0", rest)
            if kind == "attentions" and index < layers:
                return f"input_blocks.{block}.1.{rest}"
            if kind == "downsamplers" and index == 0 and rest in ("conv.weight", "conv.bias"):
                return f"input_blocks.{(level + 1) * (layers + 1)}.0.op.{param}"
            return None
        # output_blocks: per level layers + 1 resnets (each takes a skip connection).
        block = level * (layers + 1) + index
        if kind == "resnets" and index <= layers:
            return _resnet_key(f"output_blocks.{block}.0", rest)
        if kind == "attentions" and index <= layers:
            return f"output_blocks.{block}.1.{rest}"
        if kind == "upsamplers" and index == 0 and rest in ("conv.weight", "conv.bias"):
            slot = 2 if level in up_with_attention else 1
            return f"output_blocks.{level * (layers + 1) + layers}.{slot}.conv.{param}"
        return None
    if m := _UNET_MID.fullmatch(key):
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        # middle_block = (ResBlock, SpatialTransformer, ResBlock)
        if kind == "resnets" and index in (0, 1):
            return _resnet_key(f"middle_block.{2 * index}", rest)
        if kind == "attentions" and index == 0:
            return f"middle_block.1.{rest}"
    return None


def _resnet_key(block: str, rest: str) -> str | None:
    name, _, param = rest.partition(".")
    if name not in _UNET_RESNET or param not in ("weight", "bias"):
        return None
    return f"{block}.{_UNET_RESNET[name]}.{param}"


def _layers_per_block(config: Mapping) -> int:
    value = config.get("layers_per_block")
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        value = value[0]
    if not isinstance(value, int):
        raise WorkbenchError(
            f"unet config: layers_per_block must be one number for the LDM layout, got {value!r}"
        )
    return value


# VAE -----------------------------------------------------------------------------------------

_VAE_FIXED = {
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# LDM's AttnBlock uses 1x1 convs; diffusers uses Linear. Old diffusers saves used query/key/value/proj_attn.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|(downsamplers\.0\.conv))")
_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|(upsamplers\.0\.conv))")
_VAE_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)")
_VAE_MID_ATTENTION = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)")


def _vae_plan(keys: list[str], config: Mapping) -> dict[str, LdmSource]:
    if "up_block_types" not in config:
        raise WorkbenchError("vae config: up_block_types is needed to number the decoder's LDM blocks")
    levels = len(config["up_block_types"])
    out = {}
    for key in keys:
        ldm_key, op = _vae_ldm_key(key, levels)
        if ldm_key is None:
            raise WorkbenchError(f"vae: cannot place diffusers key {key!r} in the LDM layout")
        out[ldm_key] = LdmSource("vae", (key,), op)
    return out


def _vae_ldm_key(key: str, levels: int) -> tuple[str | None, str]:
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None, "copy"
    if module in _VAE_FIXED:
        return f"{_VAE_FIXED[module]}.{param}", "copy"
    if m := _VAE_DOWN.fullmatch(module):
        level = int(m.group(1))
        if m.group(4):
            return f"encoder.down.{level}.downsample.conv.{param}", "copy"
        if m.group(3) in _VAE_RESNET:
            return f"encoder.down.{level}.block.{m.group(2)}.{_VAE_RESNET[m.group(3)]}.{param}", "copy"
    if m := _VAE_UP.fullmatch(module):
        # The LDM decoder numbers its levels from the lowest resolution up, diffusers in run order.
        level = int(m.group(1))
        if level >= levels:
            return None, "copy"
        up = f"decoder.up.{levels - 1 - level}"
        if m.group(4):
            return f"{up}.upsample.conv.{param}", "copy"
        if m.group(3) in _VAE_RESNET:
            return f"{up}.block.{m.group(2)}.{_VAE_RESNET[m.group(3)]}.{param}", "copy"
    if m := _VAE_MID_RESNET.fullmatch(module):
        if m.group(3) in _VAE_RESNET:
            return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_VAE_RESNET[m.group(3)]}.{param}", "copy"
    if (m := _VAE_MID_ATTENTION.fullmatch(module)) and m.group(2) in _VAE_ATTENTION:
        name = _VAE_ATTENTION[m.group(2)]
        op = "to_conv1x1" if param == "weight" and name != "norm" else "copy"
        return f"{m.group(1)}.mid.attn_1.{name}.{param}", op
    return None, "copy"


# Text encoders -------------------------------------------------------------------------------

_CLIP_LAYER = re.compile(
    r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)"
    r"\.(weight|bias)"
)
_CLIP_OTHER = {
    "embeddings.token_embedding.weight",
    "embeddings.position_embedding.weight",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
}
_POSITION_IDS = "embeddings.position_ids"


def _te_layout(family: str, component: str) -> str:
    return _TEXT_ENCODERS[family][component][1]


def _clip_plan(component: str, keys: list[str], config: Mapping) -> dict[str, LdmSource]:
    """HF CLIP-L in an LDM file is transformers' own layout under `text_model.`."""
    out = {}
    for key in keys:
        inner = key.removeprefix("text_model.")
        if inner == _POSITION_IDS:
            continue  # rebuilt below: a stored copy may have been cast to float
        if inner not in _CLIP_OTHER and not _CLIP_LAYER.fullmatch(inner):
            raise WorkbenchError(f"{component}: cannot place diffusers key {key!r} in the LDM layout")
        out[f"text_model.{inner}"] = LdmSource(component, (key,), "copy")
    if out and config.get("max_position_embeddings", CLIP_POSITIONS) == CLIP_POSITIONS:
        out[f"text_model.{_POSITION_IDS}"] = LdmSource(component, (), "arange77")
    return out


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_OTHER = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _open_clip_plan(component: str, keys: list[str]) -> dict[str, LdmSource]:
    """OpenCLIP's resblocks fuse q, k, v into one `in_proj` (rows in q, k, v order, as
    nn.MultiheadAttention does) and keep the text projection as the matrix P of `x @ P`."""
    out: dict[str, LdmSource | None] = {}
    fused: dict[str, dict[str, str]] = {}  # LDM in_proj key -> {"q": key, "k": key, "v": key}
    for key in keys:
        if key == "text_projection.weight":
            out["text_projection"] = LdmSource(component, (key,), "transpose")
            continue
        inner = key.removeprefix("text_model.")
        if inner == _POSITION_IDS:
            continue  # a buffer OpenCLIP does not store
        if inner in _OPEN_CLIP_OTHER:
            out[_OPEN_CLIP_OTHER[inner]] = LdmSource(component, (key,), "copy")
            continue
        m = _CLIP_LAYER.fullmatch(inner)
        if m is None:
            raise WorkbenchError(f"{component}: cannot place diffusers key {key!r} in the LDM layout")
        layer, module, param = m.groups()
        block = f"transformer.resblocks.{layer}"
        if module in _OPEN_CLIP_LAYER:
            out[f"{block}.{_OPEN_CLIP_LAYER[module]}.{param}"] = LdmSource(component, (key,), "copy")
            continue
        ldm_key = f"{block}.attn.in_proj_{param}"
        out.setdefault(ldm_key, None)  # keep the slot where q, k or v first appeared
        fused.setdefault(ldm_key, {})[module[len("self_attn.")]] = key
    for ldm_key, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            lacking = sorted({"q", "k", "v"} - set(parts))
            raise WorkbenchError(
                f"{component}: cannot place diffusers key {next(iter(parts.values()))!r}: "
                f"{'/'.join(lacking)} projection missing for the fused {ldm_key}"
            )
        out[ldm_key] = LdmSource(component, (parts["q"], parts["k"], parts["v"]), "cat")
    return out  # type: ignore[return-value]  (every None slot was filled above)


# Shared --------------------------------------------------------------------------------------


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise WorkbenchError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")


def _config(configs: Mapping[str, Mapping], component: str) -> Mapping:
    config = configs.get(component)
    if not config:
        raise WorkbenchError(f"no {component} config given: it is needed to convert the {component}")
    return config
