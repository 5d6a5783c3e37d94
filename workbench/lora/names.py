"""LoRA module names: kohya module name <-> LDM key <-> diffusers module, for SD1, SD2 and SDXL.

Everything here works from a base checkpoint's header (LDM key -> dtype and shape), never from
tensor data and never from `named_modules()` (transformers >= 5.6 no longer nests `text_model` in
CLIPTextModel, so names derived from modules lose the `text_model_` that A1111, ComfyUI and kohya
match; shared/docs/LORA.md 1.1).

The names wb writes are kohya's (LORA.md 1.1-1.2):
- SD1/SD2 UNet: `lora_unet_` + the diffusers module path, dots made underscores
  (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`);
- SDXL UNet: `lora_unet_` + the LDM module path
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`);
- text encoders: `lora_te_` (SD1/SD2) or `lora_te1_`/`lora_te2_` (SDXL) + `text_model_encoder_layers_N_...`
  with HF CLIP names, also for the OpenCLIP encoders, whose q/k/v land on row slices of the fused
  `in_proj_weight`.

Reading accepts more spellings (as ComfyUI does): both UNet spellings for every family, text encoder
names with or without `text_model_`, `lora_te1_` for a one-encoder model, and diffusers/PEFT module
paths once `lora_format` has turned them into the same underscore form (`unet.` -> `lora_unet_`,
`text_encoder.` -> `lora_te_`, `text_encoder_2.` -> `lora_te2_`).

Module groups (which modules kohya adapts, LORA.md 1.1):
- "attn": Linear/Conv children of every Transformer2DModel (proj_in, proj_out, attn1/attn2 q/k/v/out,
  ff.net.0.proj, ff.net.2) -- kohya's default UNet set ("LierLa");
- "conv": ResnetBlock2D conv1/conv2/conv_shortcut/time_emb_proj and the down/up sampler convs --
  added with kohya's conv_dim ("C3Lier");
- "te": self_attn q/k/v/out_proj and mlp fc1/fc2 of every text encoder layer;
- "extra": modules kohya never adapts but other trainers do and readers map (conv_in, conv_out, the
  time and add embeddings, OpenCLIP's text_projection, SD2's unused 24th layer): baked when a file
  has them; wb's extraction writes the UNet ones as LyCORIS "full" modules (`diff` + `diff_b`);
- "norm": the UNet's GroupNorm/LayerNorm layers (ResNet norm1/norm2, the transformers' norm,
  norm1..3, conv_norm_out), LyCORIS "norm" modules (`w_norm` + `b_norm`); SD1/SD2 conv_norm_out is
  spelled `lora_unet_out_0` (A1111 resolves no diffusers spelling of it; ComfyUI reads both);
- "te_norm": the text encoders' layer norms (read and baked; A1111 resolves them, ComfyUI does not,
  so wb's extraction does not write them).
Every target whose weight has a bias also names it (`bias_key`): `NAME.diff_b` / `NAME.b_norm` land
there (docs/lora.md has which loader reads which key).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from workbench.checkpoint.safetensors_io import TensorInfo
from workbench.errors import WorkbenchError

UNET_PREFIX = "model.diffusion_model."
# family -> component -> (LDM prefix of the text model, layout, kohya prefix)
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip", "lora_te")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip", "lora_te")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip", "lora_te1"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip", "lora_te2"),
    },
}
FAMILIES = ("sd1", "sd2", "sdxl")
GROUPS = ("attn", "conv", "te", "extra", "norm", "te_norm")
# The regexes of LORA.md 1.1 (checked there to give kohya's counts), on diffusers module paths.
UNET_ATTN_RE = re.compile(
    r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\.(proj_in|proj_out|"
    r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
UNET_CONV_RE = re.compile(
    r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)(resnets\.\d+\.(conv1|conv2|conv_shortcut|"
    r"time_emb_proj)|downsamplers\.0\.conv|upsamplers\.0\.conv)"
)
UNET_EXTRA = (
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
)
TE_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
# SD2's OpenCLIP-H has 24 layers; SD2 uses the penultimate output and kohya's converted text
# encoder has 23 layers (LORA.md 1.1), so layer 23 is never part of what wb writes.
SD2_REAL_LAYERS = 24


@dataclass(frozen=True)
class Target:
    """One module a LoRA can change, in the base checkpoint's LDM layout."""

    name: str  # kohya module name, the spelling wb writes
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # diffusers/transformers module path (text encoders: without `text_model.`)
    key: str  # the LDM key of the weight it changes
    shape: tuple[int, ...]  # the module weight's shape (a q/k/v slice's shape for fused in_proj)
    group: str  # "attn" | "conv" | "te" | "extra"
    part: int | None = None  # 0/1/2: q/k/v rows of a fused OpenCLIP in_proj_weight
    transpose: bool = False  # OpenCLIP text_projection: the LDM tensor is the module weight transposed
    param: str = "weight"  # "bias": the target is the module's bias (`key` is then the bias key)

    @property
    def bias_key(self) -> str | None:
        """The LDM key of the module's bias (the base may not have one), None for text_projection."""
        if self.transpose or self.param == "bias":
            return None
        if self.key.endswith("in_proj_weight"):
            return self.key[: -len("weight")] + "bias"
        return self.key[: -len("weight")] + "bias" if self.key.endswith(".weight") else None

    def bias_target(self, infos: Mapping[str, TensorInfo]) -> Target | None:
        """The same module's bias as a target (q/k/v: its rows of the fused in_proj_bias), or None
        when the base has no bias there."""
        key = self.bias_key
        if key is None or key not in infos:
            return None
        return replace(self, key=key, shape=(self.shape[0],), param="bias")

    @property
    def rows(self) -> tuple[int, int] | None:
        """[begin, end) rows of the LDM tensor this module owns (fused q/k/v), else None."""
        if self.part is None:
            return None
        d = self.shape[0]
        return self.part * d, (self.part + 1) * d

    @property
    def kind(self) -> str:
        """The weight kind: "linear", "conv1x1", "conv" (any larger kernel) or "vector" (norms, biases)."""
        if len(self.shape) == 1:
            return "vector"
        if len(self.shape) == 2:
            return "linear"
        return "conv1x1" if tuple(self.shape[2:]) == (1, 1) else "conv"


def mangle(prefix: str, path: str) -> str:
    """kohya's rule: prefix + "." + module path, every dot made an underscore."""
    return f"{prefix}_{path}".replace(".", "_")


# ---------------------------------------------------------------------------------------------------
# family


def family_of_layout(infos: Mapping[str, TensorInfo]) -> str:
    """sd1 / sd2 / sdxl of a base checkpoint's header (refiner files are not LoRA targets)."""
    from workbench.checkpoint.describe import detect_layout

    layout = detect_layout(infos)
    if layout not in FAMILIES:
        raise WorkbenchError(f"LoRA modules are known for sd1, sd2 and sdxl checkpoints, not {layout}")
    return layout


# ---------------------------------------------------------------------------------------------------
# UNet: LDM key <-> diffusers path


def layers_per_block(ldm_unet_keys: Iterable[str]) -> int:
    """LDM numbering assumes one value: the index of the first downsampler (`input_blocks.N.0.op`)
    is layers_per_block + 1 (2 for SD1, SD2, SDXL and wb's toy)."""
    ops = [int(m.group(1)) for k in ldm_unet_keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))]
    return min(ops) - 1 if ops else 2


_RESNET_FROM_LDM = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_FIXED_FROM_LDM = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def unet_module_to_diffusers(ldm_module: str, layers: int, attention_blocks: set[str]) -> str | None:
    """The diffusers module path of an LDM UNet module path (no `model.diffusion_model.`, no param).

    `attention_blocks` are the LDM block prefixes holding a transformer (`output_blocks.5.1`), needed
    to tell an up level's attention from its upsampler. None for anything that is not a module of a
    UNet block (norm layers included: they map, but are not LoRA targets)."""
    if ldm_module in _UNET_FIXED_FROM_LDM:
        return _UNET_FIXED_FROM_LDM[ldm_module]
    span = layers + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", ldm_module):
        block, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if block == 0:
            return None
        if block % span == 0:  # a downsampler slot
            return (
                f"down_blocks.{block // span - 1}.downsamplers.0.conv" if (slot, rest) == (0, "op") else None
            )
        level, index = (block - 1) // span, (block - 1) % span
        if slot == 0:
            return _resnet(f"down_blocks.{level}.resnets.{index}", rest)
        if slot == 1:
            return f"down_blocks.{level}.attentions.{index}.{rest}"
        return None
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", ldm_module):
        slot, rest = int(m.group(1)), m.group(2)
        if slot in (0, 2):
            return _resnet(f"mid_block.resnets.{slot // 2}", rest)
        return f"mid_block.attentions.0.{rest}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", ldm_module):
        block, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, index = block // span, block % span
        if slot == 0:
            return _resnet(f"up_blocks.{level}.resnets.{index}", rest)
        if slot == 1 and f"output_blocks.{block}.1" in attention_blocks:
            return f"up_blocks.{level}.attentions.{index}.{rest}"
        if rest == "conv" and index == layers:
            return f"up_blocks.{level}.upsamplers.0.conv"
    return None


def _resnet(block: str, rest: str) -> str | None:
    return f"{block}.{_RESNET_FROM_LDM[rest]}" if rest in _RESNET_FROM_LDM else None


def _unet_group(path: str) -> str | None:
    if UNET_ATTN_RE.fullmatch(path):
        return "attn"
    if UNET_CONV_RE.fullmatch(path):
        return "conv"
    if path in UNET_EXTRA:
        return "extra"
    return None


def _unet_targets(infos: Mapping[str, TensorInfo], family: str) -> list[Target]:
    weights = {
        k[len(UNET_PREFIX) : -len(".weight")]: info
        for k, info in infos.items()
        if k.startswith(UNET_PREFIX) and k.endswith(".weight") and len(info.shape) in (1, 2, 4)
    }
    layers = layers_per_block(weights)
    attention_blocks = {
        m.group(1) for path in weights if (m := re.match(r"(output_blocks\.\d+\.1)\.proj_in$", path))
    }
    out = []
    for ldm_path, info in weights.items():
        path = unet_module_to_diffusers(ldm_path, layers, attention_blocks)
        if path is None:
            continue
        group = "norm" if len(info.shape) == 1 else _unet_group(path)
        if group is None:
            continue
        # SDXL: LDM paths (kohya's); SD1/SD2: diffusers paths, but conv_norm_out, which A1111's
        # conversion cannot resolve, in its LDM spelling (A1111's lora_unet_ -> diffusion_model_ fallback)
        spelled = ldm_path if family == "sdxl" or path == "conv_norm_out" else path
        out.append(
            Target(
                mangle("lora_unet", spelled),
                "unet",
                path,
                UNET_PREFIX + ldm_path + ".weight",
                tuple(info.shape),
                group,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------
# text encoders

_CLIP_RE = re.compile(
    r"text_model\.(encoder\.layers\.(\d+)\.(?:self_attn\.[qkvout]+_proj|mlp\.fc[12]))\.weight"
)
_OPEN_CLIP_RE = re.compile(
    r"transformer\.resblocks\.(\d+)\."
    r"(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)"
)
_CLIP_NORM_RE = re.compile(r"text_model\.(encoder\.layers\.\d+\.layer_norm[12]|final_layer_norm)\.weight")
_OPEN_CLIP_NORM_RE = re.compile(r"(?:transformer\.resblocks\.(\d+)\.ln_([12])|ln_final)\.weight")
_OPEN_CLIP_NAMES = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}


def _te_target(
    kohya: str, component: str, module: str, key: str, shape: tuple, group: str, part: int | None = None
) -> Target:
    """A text-encoder module, named as kohya spells it: <kohya prefix>_text_model_<module>."""
    return Target(mangle(kohya, "text_model." + module), component, module, key, shape, group, part=part)


def _te_targets(infos: Mapping[str, TensorInfo], family: str) -> list[Target]:
    out = []
    for component, (ldm_prefix, layout, kohya) in TEXT_ENCODERS[family].items():
        keys = {k[len(ldm_prefix) :]: info for k, info in infos.items() if k.startswith(ldm_prefix)}
        if layout == "clip":
            for rest, info in keys.items():
                if m := _CLIP_NORM_RE.fullmatch(rest):
                    key = ldm_prefix + rest
                    out.append(_te_target(kohya, component, m.group(1), key, tuple(info.shape), "te_norm"))
                if (m := _CLIP_RE.fullmatch(rest)) is None:
                    continue
                key = ldm_prefix + rest
                out.append(_te_target(kohya, component, m.group(1), key, tuple(info.shape), "te"))
            continue
        n_layers = len({m.group(1) for rest in keys if (m := _OPEN_CLIP_RE.fullmatch(rest))})
        for rest, info in keys.items():
            if rest == "text_projection" and len(info.shape) == 2:
                out.append(
                    Target(
                        mangle(kohya, "text_projection"),
                        component,
                        "text_projection",
                        ldm_prefix + rest,
                        tuple(info.shape[::-1]),
                        "extra",
                        transpose=True,
                    )
                )
                continue
            if m := _OPEN_CLIP_NORM_RE.fullmatch(rest):
                module = (
                    "final_layer_norm"
                    if m.group(1) is None
                    else f"encoder.layers.{m.group(1)}.layer_norm{m.group(2)}"
                )
                key = ldm_prefix + rest
                out.append(_te_target(kohya, component, module, key, tuple(info.shape), "te_norm"))
                continue
            if (m := _OPEN_CLIP_RE.fullmatch(rest)) is None:
                continue
            layer, what = int(m.group(1)), m.group(2)
            group = (
                "extra" if family == "sd2" and n_layers == SD2_REAL_LAYERS and layer == n_layers - 1 else "te"
            )
            base = f"encoder.layers.{layer}."
            if what == "attn.in_proj_weight":
                d = info.shape[0] // 3
                for part, letter in enumerate("qkv"):
                    module = f"{base}self_attn.{letter}_proj"
                    key, shape = ldm_prefix + rest, (d, *info.shape[1:])
                    out.append(_te_target(kohya, component, module, key, shape, group, part=part))
                continue
            module = base + _OPEN_CLIP_NAMES[what]
            out.append(_te_target(kohya, component, module, ldm_prefix + rest, tuple(info.shape), group))
    return out


def _layer_order(t: Target) -> tuple:
    m = re.search(r"layers\.(\d+)\.(.+)", t.module)
    if m is None:
        return (99999, 0)
    return (int(m.group(1)), TE_MODULES.index(m.group(2)) if m.group(2) in TE_MODULES else 9)


# ---------------------------------------------------------------------------------------------------
# public


def lora_targets(infos: Mapping[str, TensorInfo], family: str | None = None) -> dict[str, Target]:
    """Every module of a base checkpoint (its LDM header) a LoRA can change, by kohya name.

    Order: UNet in file order, then each text encoder layer by layer (q, k, v, out, fc1, fc2)."""
    family = family or family_of_layout(infos)
    if family not in FAMILIES:
        raise WorkbenchError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
    unet = _unet_targets(infos, family)
    te = _te_targets(infos, family)
    te.sort(key=lambda t: (t.component, _layer_order(t)))
    return {t.name: t for t in [*unet, *te]}


def default_targets(
    targets: Mapping[str, Target], groups: Iterable[str] = ("attn", "te")
) -> dict[str, Target]:
    """The targets of the given groups (kohya's default LoRA: attn + te; with conv_dim: + conv)."""
    wanted = set(groups)
    return {name: t for name, t in targets.items() if t.group in wanted}


def name_index(targets: Mapping[str, Target], family: str) -> dict[str, Target]:
    """Every accepted spelling of a module name (underscore form) -> its target."""
    index: dict[str, Target] = {}
    for t in targets.values():
        spellings = {t.name}
        if t.component == "unet":
            spellings.add(mangle("lora_unet", t.module))
            spellings.add(mangle("lora_unet", t.key[len(UNET_PREFIX) : -len(".weight")]))
        else:
            own = TEXT_ENCODERS[family][t.component][2]
            prefixes = {own}
            if t.component == "text_encoder":
                prefixes |= {"lora_te", "lora_te1"}
            for p in prefixes:
                spellings.add(mangle(p, "text_model." + t.module))
                spellings.add(mangle(p, t.module))
        for s in spellings:
            index.setdefault(s, t)
    return index


def kohya_names_for_diffusers(
    component: str, keys: Iterable[str], family: str, layers: int = 2
) -> dict[str, str]:
    """diffusers/transformers module path -> kohya name, for every LoRA-able module among a model
    component's state-dict keys (`keys` are the whole component's, e.g. `unet.state_dict().keys()`,
    so that an up level's upsampler can be told from its attention). Text encoder paths may carry
    `text_model.` or not (transformers 4 vs 5); the kohya name always has `text_model_`.

    For a LoRA trained on diffusers modules (PEFT): name each adapted module with this map."""
    keys = list(keys)
    if family not in FAMILIES:
        raise WorkbenchError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
    if component == "unet":
        from workbench.checkpoint.convert import diffusers_to_ldm_plan

        weights = [k for k in keys if k.endswith(".weight")]
        plan = diffusers_to_ldm_plan({"unet": weights}, family, {"unet": {"layers_per_block": layers}})
        out = {}
        for ldm_key, src in plan.items():
            path = src.keys[0][: -len(".weight")]
            if _unet_group(path) is None:
                continue
            spelled = ldm_key[len(UNET_PREFIX) : -len(".weight")] if family == "sdxl" else path
            out[path] = mangle("lora_unet", spelled)
        return out
    if component not in TEXT_ENCODERS[family]:
        raise WorkbenchError(f"{family} has no {component}")
    kohya = TEXT_ENCODERS[family][component][2]
    out = {}
    for k in keys:
        path = k.removesuffix(".weight")
        inner = path.removeprefix("text_model.")
        if re.fullmatch(r"encoder\.layers\.\d+\.(self_attn\.[qkvout]+_proj|mlp\.fc[12])", inner):
            out[path] = mangle(kohya, "text_model." + inner)
    return out
