"""LoRA files: read kohya, diffusers/PEFT and LyCORIS (LoHa, LoKr, LoCon) files; write kohya files.

Formats (shared/docs/LORA.md 1.1-1.6):
- kohya (what A1111, ComfyUI, Forge, civitai read): `NAME.lora_down.weight`, `NAME.lora_up.weight`,
  `NAME.alpha` (any dtype, 0-dim or one element; absent means alpha = rank), NAME starting with
  `lora_unet_`, `lora_te_`, `lora_te1_` or `lora_te2_`. LyCORIS uses the same names with
  `lora_mid` (Tucker LoCon), `hada_*` (LoHa) or `lokr_*` (LoKr) tensors.
- extras (LyCORIS "full" and "norm" modules, read by ComfyUI and A1111, see docs/lora.md): per module
  `NAME.diff` (the weight change) and `NAME.diff_b` (the bias change), or `NAME.w_norm` / `NAME.b_norm`
  for a GroupNorm/LayerNorm; `NAME.diff_b` next to `lora_up`/`lora_down` is the bias change of a LoRA
  module. No alpha, no scale: W' = W + m * diff, b' = b + m * diff_b.
- diffusers/PEFT: `unet.|text_encoder.|text_encoder_2.` + module path + `.lora_A.weight` (down) /
  `.lora_B.weight` (up), or `.lora.down.weight` / `.lora.up.weight`, or the old attention-processor
  spelling `...attn1.processor.to_q_lora.down.weight`; alphas from `.alpha` tensors or from the
  `lora_adapter_metadata` JSON (`unet.lora_alpha`, ...), else alpha = rank.

Opening reads the header only. Module names are brought to kohya's underscore form (`unet.` ->
`lora_unet_`, `text_encoder.` -> `lora_te_`, `text_encoder_2.` -> `lora_te2_`, dots -> underscores)
so that `workbench.lora.names.name_index` can look every format up the same way.

Writing: kohya keys and metadata (`ss_*` minimum keys, `modelspec.*` so A1111 shows the file for
the right model, `sshs_model_hash` = sha256 of the tensor data as written), through the streaming
writer (temporary file, renamed when complete).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.checkpoint.reader import Checkpoint, open_checkpoint
from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, info_of, read_header
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Key prefixes of single-file checkpoints (LDM layout): such a file is a model, not a LoRA.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model.")
PEFT_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
# kohya / LyCORIS tensor suffix -> role
KOHYA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
    "lokr_w2_b": "w2b", "lokr_t2": "t2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
}  # fmt: skip
# The weight part and the bias part of the extra kinds (a "bias" module is the bias half of any module).
WEIGHT_ROLE = {"full": "diff", "norm": "w_norm"}
BIAS_ROLES = ("diff_b", "b_norm")
EXTRA_KINDS = ("full", "norm")
_KOHYA_KEY = re.compile(
    r"(lora_(?:unet|te[12]?)_\w+?)\.(" + "|".join(re.escape(s) for s in KOHYA_ROLES) + r")"
)
_PEFT_KEY = re.compile(
    r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)"
)
_PEFT_ROLES = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha",
}  # fmt: skip
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
KINDS = ("lora", "locon", "loha", "lokr", "full", "norm")
CONV_NAME = re.compile(
    r"resnets|in_layers|out_layers|emb_layers|skip_connection|samplers|_op$|conv_in|conv_out"
)


@dataclass
class LoraModule:
    """One adapted module of a LoRA file (header facts only)."""

    name: str  # kohya underscore form, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    kind: str  # "lora" | "loha" | "lokr" | "full" | "norm" | "bias" (the bias half, see bias_part)
    keys: dict[str, str]  # role -> key in the file (down, up, mid, alpha, w1a, ...)
    infos: dict[str, TensorInfo]  # role -> dtype and shape
    alpha_hint: float | None = None  # PEFT: the alpha the adapter config gives (no alpha tensor)

    @property
    def has_weight(self) -> bool:
        """Whether the module changes a weight (a full/norm module may hold only its bias change)."""
        if self.kind == "bias":
            return False
        return self.kind not in WEIGHT_ROLE or WEIGHT_ROLE[self.kind] in self.keys

    @property
    def bias_role(self) -> str | None:
        return next((r for r in BIAS_ROLES if r in self.keys), None)

    def bias_part(self) -> LoraModule | None:
        """The bias change (`diff_b` / `b_norm`) as a module of its own (kind "bias"), or None."""
        role = self.bias_role
        if role is None:
            return None
        return LoraModule(self.name, "bias", {"bias": self.keys[role]}, {"bias": self.infos[role]})

    def _whole(self) -> TensorInfo:
        """The tensor that is the whole change of a full/norm/bias module."""
        role = {"bias": "bias"}.get(self.kind) or WEIGHT_ROLE[self.kind]
        if role not in self.infos:  # a full/norm module with only a bias change
            role = self.bias_role
        return self.infos[role]

    @property
    def rank(self) -> int:
        if self.kind in ("full", "norm", "bias"):
            return 0  # a whole tensor, no factors
        if self.kind == "lora":
            return self.infos["down"].shape[0]
        if self.kind == "loha":
            return self.infos["w1b"].shape[0]
        for role in ("w1b", "w2b"):
            if role in self.infos:
                return self.infos[role].shape[0]
        return 0  # LoKr with two full factors: no rank

    @property
    def out_features(self) -> int:
        if self.kind in ("full", "norm", "bias"):
            return self._whole().shape[0]
        if self.kind == "lora":
            return self.infos["up"].shape[0]
        if self.kind == "loha":
            return self.infos["w1a"].shape[1 if "t1" in self.infos else 0]
        return self._lokr_factor("w1")[0] * self._lokr_factor("w2")[0]

    @property
    def numel(self) -> int:
        """Element count of the weight change this module makes."""
        if self.kind in ("full", "norm", "bias"):
            return self._whole().numel
        if self.kind == "lora":
            down = self.infos["down"].shape
            if "mid" in self.infos:
                mid = self.infos["mid"].shape
                return self.out_features * down[1] * _prod(mid[2:])
            return self.out_features * _prod(down[1:])
        if self.kind == "loha":
            if "t1" in self.infos:
                a, b, t = self.infos["w1a"].shape, self.infos["w1b"].shape, self.infos["t1"].shape
                return a[1] * b[1] * _prod(t[2:])
            return self.infos["w1a"].shape[0] * _prod(self.infos["w1b"].shape[1:])
        w1, w2 = self._lokr_factor("w1"), self._lokr_factor("w2")
        return _prod(w1) * _prod(w2)

    @property
    def is_conv(self) -> bool:
        """A kernel larger than 1x1 (a 3x3 conv module)."""
        if self.kind in ("full", "norm", "bias"):
            return False  # reported as extras, not as LoCon modules
        return any(len(i.shape) == 4 and tuple(i.shape[2:]) != (1, 1) for i in self.infos.values())

    def _lokr_factor(self, w: str) -> tuple[int, ...]:
        if w in self.infos:
            return tuple(self.infos[w].shape)
        a, b = self.infos[w + "a"].shape, self.infos[w + "b"].shape
        if w == "w2" and "t2" in self.infos:
            return (a[1], b[1], *self.infos["t2"].shape[2:])
        return (a[0], _prod(b[1:]))


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class LoraFile:
    """An opened LoRA file: modules known from the header, tensors read on demand."""

    path: Path
    format: str  # "kohya" | "diffusers"
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    ckpt: Checkpoint = field(repr=False)

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    @property
    def kind(self) -> str:
        """lora, locon (a LoRA with conv modules), loha, lokr (or "mixed" when several LyCORIS kinds);
        full/norm modules (extras) do not change it, unless the file has nothing else."""
        low = self.kinds - set(EXTRA_KINDS)
        if not low:
            return "full" if "full" in self.kinds else "norm"
        kinds = low - {"lora"}
        if len(kinds) > 1:
            return "mixed"
        if kinds:
            return kinds.pop()
        if any(m.kind == "lora" and (m.is_conv or CONV_NAME.search(m.name)) for m in self.modules.values()):
            return "locon"
        return "lora"

    def tensor(self, module: LoraModule, role: str) -> torch.Tensor:
        return self.ckpt[module.keys[role]]

    def alpha(self, module: LoraModule) -> float | None:
        """The module's alpha (reads one scalar), or None when the file has none (alpha = rank)."""
        if "alpha" in module.keys:
            t = self.tensor(module, "alpha")
            if t.numel() != 1:
                raise WorkbenchError(f"{self.path}: {module.keys['alpha']} holds {t.numel()} values, not one")
            return float(t.reshape(-1)[0].item())
        return module.alpha_hint

    def tensors(self, module: LoraModule) -> dict[str, torch.Tensor]:
        """role -> tensor of a module (alpha excluded); refuses a non-finite one, naming it (the
        factors are small to check, and a NaN in one spoils whole rows of the change)."""
        t = {role: self.tensor(module, role) for role in module.keys if role not in ("alpha", *BIAS_ROLES)}
        for role, factor in t.items():
            if factor.is_floating_point() and not _all_finite(factor):
                raise WorkbenchError(f"{self.path}: module {module.name}: {module.keys[role]} is not finite")
        return t

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(up [out, r], down [r, in*kh*kw], scale alpha/r) in float32, for a plain LoRA module (no
        Tucker mid): dW = scale * up @ down, flattened like the weight."""
        import torch

        from workbench.lora.math import scale_of

        if module.kind != "lora" or "mid" in module.keys:
            raise WorkbenchError(f"{self.path}: module {module.name} is {module.kind}, not a plain LoRA")
        up = self.tensor(module, "up").to(torch.float32).flatten(1)
        down = self.tensor(module, "down").to(torch.float32).flatten(1)
        for role, factor in (("up", up), ("down", down)):
            if not _all_finite(factor):
                raise WorkbenchError(f"{self.path}: module {module.name}: {module.keys[role]} is not finite")
        return up, down, scale_of(self.alpha(module), module.rank)

    def delta(self, module: LoraModule, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The module's weight change (alpha/rank included, no strength) in float32, shaped to `shape`."""
        from workbench.lora import math as lm

        if module.kind in ("full", "norm", "bias"):
            return self._whole_delta(module, shape)
        t = self.tensors(module)
        alpha = self.alpha(module)
        try:
            if module.kind == "lora":
                return lm.lora_delta(t["up"], t["down"], alpha, shape, t.get("mid"))
            if shape is None:
                raise WorkbenchError(f"{module.name}: a {module.kind} module needs the weight's shape")
            if module.kind == "loha":
                return lm.loha_delta(
                    t["w1a"], t["w1b"], t["w2a"], t["w2b"], alpha, shape, t.get("t1"), t.get("t2")
                )
            return lm.lokr_delta(
                t.get("w1"),
                t.get("w1a"),
                t.get("w1b"),
                t.get("w2"),
                t.get("w2a"),
                t.get("w2b"),
                alpha,
                shape,
                t.get("t2"),
            )
        except WorkbenchError as e:
            raise WorkbenchError(f"{self.path}: {module.name}: {e}") from None

    def _whole_delta(self, module: LoraModule, shape: tuple[int, ...] | None) -> torch.Tensor:
        """A full/norm module's weight change (`diff` / `w_norm`), or a bias module's change, in
        float32 shaped to `shape` (a Linear diff may land on a 1x1 conv and back); no alpha, no scale."""
        import torch

        role = "bias" if module.kind == "bias" else WEIGHT_ROLE[module.kind]
        if role not in module.keys:
            raise WorkbenchError(f"{self.path}: module {module.name} has no {role} tensor")
        t = self.tensor(module, role)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WorkbenchError(f"{self.path}: module {module.name}: {module.keys[role]} is not finite")
        t = t.to(torch.float32)
        if shape is None:
            return t
        if t.numel() != _prod(shape):
            raise WorkbenchError(
                f"{self.path}: {module.keys[role]} is {list(t.shape)}, the weight is {list(shape)}"
            )
        return t.reshape(shape)

    def bias_delta(self, module: LoraModule) -> torch.Tensor | None:
        """The module's bias change (`diff_b` / `b_norm`) in float32, or None."""
        part = module.bias_part()
        return None if part is None else self._whole_delta(part, None)

    def close(self) -> None:
        self.ckpt.close()


# ---------------------------------------------------------------------------------------------------
# reading


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite float32 sum says so at once (a NaN or an inf makes
    the sum NaN or inf); only an overflowing sum needs the elementwise check, 40x slower on a CPU."""
    import torch

    return math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def open_lora(path: str | os.PathLike) -> LoraFile:
    """Open a LoRA file from its header. An unknown key layout raises WorkbenchError naming the first
    key that is not part of a LoRA module; a module lacking a tensor names the module."""
    ckpt = open_checkpoint(path)
    keys = list(ckpt.infos)
    if not keys:
        raise WorkbenchError(f"{ckpt.path}: no tensors: not a LoRA")
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        modules, fmt = _kohya_modules(ckpt), "kohya"
    else:
        modules, fmt = _peft_modules(ckpt), "diffusers"
    for m in modules.values():
        _check_complete(ckpt.path, m)
    return LoraFile(ckpt.path, fmt, modules, dict(ckpt.metadata), ckpt)


def is_lora_file(path: str | os.PathLike) -> bool:
    """Whether a safetensors header looks like a LoRA (every key a LoRA module's tensor)."""
    try:
        header = read_header(Path(path))
    except WorkbenchError:
        return False
    keys = list(header.infos)
    if not keys:
        return False
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        return False  # a model (perhaps with a stray LoRA key): described as a checkpoint
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return True  # open_lora names any key that is not part of a module
    return all(_PEFT_KEY.fullmatch(k) or _PROCESSOR.fullmatch(k) for k in keys) and any(
        ("lora" in k) for k in keys
    )


def _kohya_modules(ckpt: Checkpoint) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    for key, info in ckpt.infos.items():
        m = _KOHYA_KEY.fullmatch(key)
        if m is None:
            raise WorkbenchError(f"{ckpt.path}: key {key!r} is not part of a kohya/LyCORIS LoRA module")
        name, suffix = m.groups()
        role = KOHYA_ROLES[suffix]
        mod = modules.setdefault(name, LoraModule(name, "", {}, {}))
        if role in mod.keys:
            raise WorkbenchError(f"{ckpt.path}: module {name} has two {role} tensors")
        mod.keys[role], mod.infos[role] = key, info
    for mod in modules.values():
        suffixes = [key.rsplit(".", 1)[-1] if "." in key else key for key in mod.keys.values()]
        if any(s.startswith("hada_") for s in suffixes):
            mod.kind = "loha"
        elif any(s.startswith("lokr_") for s in suffixes):
            mod.kind = "lokr"
        elif {"down", "up", "mid"} & set(mod.keys):
            mod.kind = "lora"  # with diff_b: the module's bias change too
        elif {"w_norm", "b_norm"} & set(mod.keys):
            mod.kind = "norm"
        else:
            mod.kind = "full"  # diff (+ diff_b), or diff_b alone (the weight unchanged)
    return modules


def _peft_name(path: str) -> str:
    """A diffusers/PEFT module path -> kohya underscore form (component prefix made kohya's)."""
    path = path.removeprefix("base_model.model.")
    for prefix, kohya in PEFT_PREFIXES.items():
        if path.startswith(prefix):
            return kohya + path[len(prefix) :].replace(".", "_")
    # a bare PEFT state dict of one model: text encoder paths say so, anything else is the UNet
    if path.startswith(("text_model.", "encoder.layers.")):
        return "lora_te_" + path.replace(".", "_")
    return "lora_unet_" + path.replace(".", "_")


def _peft_modules(ckpt: Checkpoint) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    paths: dict[str, str] = {}
    for key, info in ckpt.infos.items():
        if m := _PROCESSOR.fullmatch(key):
            block, proj, role = m.groups()
            path = f"{block}.{proj}.0" if proj == "to_out" else f"{block}.{proj}"
        elif m := _PEFT_KEY.fullmatch(key):
            path, role = m.group(1), _PEFT_ROLES[m.group(2)]
        else:
            raise WorkbenchError(
                f"{ckpt.path}: key {key!r} is not part of a LoRA module (kohya lora_unet_/lora_te_ "
                "names or diffusers/PEFT lora_A/lora_B keys expected)"
            )
        name = _peft_name(path)
        paths[name] = path
        mod = modules.setdefault(name, LoraModule(name, "lora", {}, {}))
        if role in mod.keys:
            raise WorkbenchError(f"{ckpt.path}: module {path} has two {role} tensors")
        mod.keys[role], mod.infos[role] = key, info
    config = _adapter_config(ckpt)
    for name, mod in modules.items():
        if "alpha" not in mod.keys:
            mod.alpha_hint = _config_alpha(config, paths[name])
    return modules


def _adapter_config(ckpt: Checkpoint) -> dict:
    raw = ckpt.metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _config_alpha(config: Mapping, path: str) -> float | None:
    """PEFT alpha of a module from diffusers' `lora_adapter_metadata` (keys prefixed by component):
    alpha_pattern entries whose key ends the module path win over the component's lora_alpha."""
    component = (
        path.split(".", 1)[0] if path.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") else None
    )
    if component is None:
        value = config.get("lora_alpha")
        return float(value) if isinstance(value, (int, float)) else None
    inner = path[len(component) + 1 :]
    pattern = config.get(f"{component}.alpha_pattern")
    if isinstance(pattern, dict):
        for k, v in pattern.items():
            if inner == k or inner.endswith("." + k):
                return float(v)
    value = config.get(f"{component}.lora_alpha")
    return float(value) if isinstance(value, (int, float)) else None


_NEEDS = {"lora": ({"down", "up"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},)}
_LOW_RANK_ROLES = {r for s, r in KOHYA_ROLES.items() if s.startswith(("lora_", "hada_", "lokr_"))}


def _check_complete(path: Path, mod: LoraModule) -> None:
    roles = set(mod.keys)
    mixed = {"w_norm", "b_norm"} & roles and ({"diff", "diff_b"} | _LOW_RANK_ROLES) & roles
    if mixed or ({"diff"} & roles and _LOW_RANK_ROLES & roles):
        raise WorkbenchError(f"{path}: module {mod.name} mixes {', '.join(sorted(mod.keys.values()))}")
    if mod.kind in ("full", "norm"):
        if not roles - {"alpha"}:
            only = ", ".join(sorted(mod.keys.values()))
            raise WorkbenchError(
                f"{path}: module {mod.name} has no down/up tensor (nor diff, w_norm): only {only}"
            )
        weight, bias = mod.infos.get(WEIGHT_ROLE[mod.kind]), mod.infos.get(mod.bias_role or "")
        if bias is not None and (
            len(bias.shape) != 1 or (weight is not None and bias.shape[0] != weight.shape[0])
        ):
            shown = list(weight.shape) if weight is not None else "no"
            raise WorkbenchError(
                f"{path}: module {mod.name}: {mod.keys[mod.bias_role]} is {list(bias.shape)}, "
                f"not one value per output of its {shown} weight change"
            )
        return
    if mod.kind in _NEEDS:
        lacking = sorted(_NEEDS[mod.kind][0] - roles)
        if lacking:
            raise WorkbenchError(f"{path}: module {mod.name} has no {'/'.join(lacking)} tensor")
    else:
        for w in ("w1", "w2"):
            if w not in roles and not {w + "a", w + "b"} <= roles:
                raise WorkbenchError(f"{path}: LoKr module {mod.name} has neither lokr_{w} nor lokr_{w}_a/_b")
    if "alpha" in mod.infos and mod.infos["alpha"].numel != 1:
        raise WorkbenchError(
            f"{path}: {mod.keys['alpha']} must be one number, it is {list(mod.infos['alpha'].shape)}"
        )
    if mod.kind == "lora":
        down, up = mod.infos["down"].shape, mod.infos["up"].shape
        if len(down) not in (2, 4) or len(up) not in (2, 4) or up[1] != down[0]:
            raise WorkbenchError(
                f"{path}: module {mod.name}: lora_up {list(up)} and lora_down {list(down)} do not multiply"
            )
    if mod.bias_role is not None:
        bias = mod.infos[mod.bias_role]
        if len(bias.shape) != 1 or bias.shape[0] != mod.out_features:
            raise WorkbenchError(
                f"{path}: module {mod.name}: {mod.keys[mod.bias_role]} is {list(bias.shape)}, "
                f"the module has {mod.out_features} outputs"
            )


# ---------------------------------------------------------------------------------------------------
# family of a LoRA file (no base needed)

SS_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sd2-v": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sd2-v": "768x768", "sdxl": "1024x1024"}


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = (metadata.get("ss_base_model_version") or "").lower()
    arch = (metadata.get("modelspec.architecture") or "").lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if (
        version.startswith("sd_v2")
        or metadata.get("ss_v2") == "True"
        or arch.startswith("stable-diffusion-v2")
    ):
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def family_from_keys(lora: LoraFile) -> str | None:
    """sd1 / sd2 / sdxl from module names and shapes alone (None when they cannot tell):
    te1/te2 prefixes or LDM-spelled UNet names say SDXL; a 4-D proj_in LoRA says SD1 (SD2 and SDXL
    use linear projections); several transformer blocks per attention say SDXL; otherwise the text
    encoder's width (768 CLIP-L, 1024 OpenCLIP-H) separates SD1 from SD2."""
    names = list(lora.modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    if any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in names):
        return "sdxl"
    if any(re.search(r"_transformer_blocks_[1-9]", n) for n in names):
        return "sdxl"
    for n, m in lora.modules.items():
        if m.kind == "lora" and re.search(r"_proj_in$", n) and n.startswith("lora_unet_"):
            return "sd1" if len(m.infos["down"].shape) == 4 else "sd2"
    for n, m in lora.modules.items():
        if m.kind == "lora" and n.endswith("_self_attn_q_proj"):
            width = m.infos["down"].shape[1]
            return {768: "sd1", 1024: "sd2"}.get(width)
    return None


def lora_family(lora: LoraFile) -> tuple[str | None, str]:
    """(family, how it was told): from the keys first, else from the metadata."""
    fam = family_from_keys(lora)
    if fam is not None:
        return fam, "keys"
    fam = family_from_metadata(lora.metadata)
    return fam, ("metadata" if fam else "unknown")


# ---------------------------------------------------------------------------------------------------
# hashes


def data_sha256(path: str | os.PathLike) -> str:
    """kohya's `sshs_model_hash`: sha256 of the bytes after the 8-byte length and the JSON header
    (the tensor data only; independent of metadata edits)."""
    p = Path(path)
    start = read_header(p).data_start
    h = hashlib.sha256()
    with open(p, "rb") as f:
        f.seek(start)
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# writing


@dataclass
class KohyaModule:
    """What wb writes for one module: dW = (alpha / rank) * up @ down."""

    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    alpha: float


def kohya_metadata(
    family: str, dim: int | str, alpha: float | str, *, conv_dim: int | None = None,
    conv_alpha: float | None = None, v_prediction: bool = False, title: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:  # fmt: skip
    """kohya's minimum `ss_*` keys and the required `modelspec.*` keys for a LoRA of `family`."""
    if family not in SS_VERSIONS:
        raise WorkbenchError(f"unknown model family {family!r} for LoRA metadata")
    version = SS_VERSIONS[family] + ("_v" if v_prediction and family == "sd2" else "")
    spec = "sd2-v" if family == "sd2" and v_prediction else family
    args: dict[str, str] = {}
    if conv_dim:
        args = {
            "conv_dim": str(conv_dim),
            "conv_alpha": str(conv_alpha if conv_alpha is not None else conv_dim),
        }
    meta = {
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCH[spec],
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers"
        ),
        "modelspec.title": title or f"LoRA@{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}",
        "modelspec.resolution": RESOLUTION[spec],
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


@dataclass
class WriteResult:
    path: Path
    modules: int
    bytes: int
    sshs_model_hash: str
    zeroed: int  # entries that were non-zero in float32 and became exactly 0 in the save dtype
    extra_tensors: int = 0  # diff / diff_b / w_norm / b_norm tensors written
    extra_bytes: int = 0  # their data


EXTRA_SUFFIXES = ("diff", "diff_b", "w_norm", "b_norm")


def write_kohya(
    path: str | os.PathLike,
    modules: Mapping[str, KohyaModule],
    metadata: Mapping[str, str],
    dtype: str = "F16",
    inputs: Iterable[str | os.PathLike] = (),
    extras: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> WriteResult:
    """Write a kohya LoRA: for each module (in the given order) `NAME.lora_down.weight`,
    `NAME.lora_up.weight` in `dtype` and `NAME.alpha` (0-dim float32), then the `extras`
    (name -> {"diff" | "diff_b" | "w_norm" | "b_norm": tensor}, whole changes in `dtype`: LyCORIS
    full/norm modules, or `diff_b` of a module above), plus `metadata` and `sshs_model_hash`
    (sha256 of the data section, computed before writing, equal to what A1111 recomputes from the
    file). Nothing is left behind on error."""
    import torch

    from workbench.checkpoint.safetensors_io import _tensor_bytes, torch_dtypes

    extras = extras or {}
    if not modules and not extras:
        raise WorkbenchError(f"{path}: no module to write")
    target = torch_dtypes()[dtype]
    tensors: dict[str, torch.Tensor] = {}
    zeroed = 0
    for name, mod in modules.items():
        if not name.startswith(KOHYA_PREFIXES):
            raise WorkbenchError(f"{name}: not a kohya module name")
        for role, t in (("lora_down.weight", mod.down), ("lora_up.weight", mod.up)):
            if not torch.isfinite(t).all():
                raise WorkbenchError(f"{name}: {role} is not finite")
            cast = t.detach().to(target).contiguous()
            zeroed += int(((cast == 0) & (t != 0)).sum())
            tensors[f"{name}.{role}"] = cast
        tensors[f"{name}.alpha"] = torch.tensor(float(mod.alpha), dtype=torch.float32)
    extra_tensors = extra_bytes = 0
    for name, parts in extras.items():
        if not name.startswith(KOHYA_PREFIXES):
            raise WorkbenchError(f"{name}: not a kohya module name")
        for role, t in parts.items():
            if role not in EXTRA_SUFFIXES:
                raise WorkbenchError(f"{name}: {role} is not one of {', '.join(EXTRA_SUFFIXES)}")
            if not torch.isfinite(t).all():
                raise WorkbenchError(f"{name}: {role} is not finite")
            cast = t.detach().to(target).contiguous()
            zeroed += int(((cast == 0) & (t != 0)).sum())
            tensors[f"{name}.{role}"] = cast
            extra_tensors += 1
            extra_bytes += cast.numel() * cast.element_size()
    h = hashlib.sha256()
    for t in tensors.values():
        h.update(_tensor_bytes(t))
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"] = h.hexdigest()
    plan = {k: info_of(t) for k, t in tensors.items()}
    out = Path(path)
    with SafetensorsWriter(out, plan, meta, inputs) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return WriteResult(
        out, len(modules), out.stat().st_size, meta["sshs_model_hash"], zeroed, extra_tensors, extra_bytes
    )
