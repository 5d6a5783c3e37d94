"""LoRAs in grids: A1111's `<lora:NAME:TE[:UNET]>` prompt tags, the `lora` / `lora_weight` axes, and
applying LoRAs in place on the grid's one pipeline.

Prompt tags (A1111 `extra_networks`): `<lora:NAME>`, `<lora:NAME:TE>`, `<lora:NAME:TE:UNET>` or
named `te=`/`unet=`; TE defaults to 1 and UNET to TE. Tags are removed from the text the text
encoder sees; the prompt written into the PNG info keeps them, as A1111 writes it. NAME is looked
up as a file stem (`NAME.safetensors`) in the LoRAs the grid was given (`--loras` paths), then in
each `--lora-dir`, then in the folder of the first checkpoint, then `models/Lora`.

The `--loras a,b,none` axis appends `<lora:STEM:W>` to each cell's prompt (W from `--lora-weight`,
default 1), so every cell's PNG info says how to reproduce it in A1111, and the prompt tags are the
one place a cell's LoRAs come from.

Applying: W <- W + m * dW for every module (the bake math of workbench/lora: alpha/rank included,
computed in float32, written in the weight's dtype). The original tensors of the touched modules
are kept and every change is computed from them (original + the sum of the LoRAs' m * dW), and a
module no LoRA touches any more gets its original back: never subtracted, so switching back is
bit-exact. Switching costs a pass over the modules whose LoRA strengths changed, never a rebuild.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError
from workbench.grids.axes import AxisKind, register_kind

# The two axis kinds, in the registry of grids/axes.py; their values travel in GridRequest.extra
# ("lora": files or none, "lora_weight": strengths) and each cell's in Cell.extra. A1111 has no such
# axis type: the grid's infotext names them as wb does (its cells' prompts carry the <lora:> tags).
register_kind(AxisKind("lora", "--loras", "LoRA"))
register_kind(AxisKind("lora_weight", "--lora-weight", "LoRA weight", "float", "LoRA weight"))

# A1111's extra-network tag: <kind:arguments>
if TYPE_CHECKING:
    import torch

TAG = re.compile(r"<(\w+):([^>]+)>")
NONE = "none"


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its extra-network tags, the LoRA tags in order). ValueError when a tag's
    multiplier is not a number."""
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        if m[1] == "lora":
            args = [a.strip() for a in m[2].split(":")]
            named = {k.strip(): v.strip() for k, _, v in (a.partition("=") for a in args[1:] if "=" in a)}
            plain = [a for a in args[1:] if "=" not in a]
            try:
                te = float(named.get("te", plain[0] if plain else 1.0))
                unet = float(named.get("unet", plain[1] if len(plain) > 1 else te))
            except ValueError:
                raise ValueError(f"{m[0]}: the multipliers must be numbers") from None
            tags.append(LoraTag(args[0], te, unet))
        return ""  # A1111 removes every extra-network tag (hypernet, ...) from the encoded text

    return TAG.sub(take, prompt), tags  # as A1111: the tag goes, the text around it stays


def strip_tags(prompt: str) -> str:
    return parse_lora_tags(prompt)[0]


def format_weight(w: float) -> str:
    return str(int(w)) if float(w).is_integer() else f"{w:g}"


def lora_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{format_weight(weight)}>"


# --- finding files ------------------------------------------------------------------------------


@dataclass
class LoraLookup:
    """NAME -> file: the grid's explicit LoRA files by stem, then the folders in order."""

    explicit: dict[str, Path] = field(default_factory=dict)
    folders: list[Path] = field(default_factory=list)

    def find(self, name: str) -> Path | None:
        if name in self.explicit:
            return self.explicit[name]
        for folder in self.folders:
            for suffix in (".safetensors", ".pt", ".ckpt"):
                path = folder / f"{name}{suffix}"
                if path.is_file():
                    return path
        return None

    def resolve(self, name: str) -> Path:
        path = self.find(name)
        if path is None:
            where = ", ".join(str(f) for f in self.folders) or "no folder"
            raise WorkbenchError(f"<lora:{name}>: no LoRA named {name} in the --loras files or in {where}")
        return path


def default_folders(lora_dirs: list[Path], first_checkpoint: Path | None) -> list[Path]:
    """--lora-dir folders, then the first checkpoint's folder, then models/Lora (A1111's)."""
    folders = list(lora_dirs)
    if first_checkpoint is not None:
        folders.append(first_checkpoint.parent)
    folders.append(Path("models") / "Lora")
    return folders


def axis_loras(values: list[str]) -> tuple[list[str | None], dict[str, Path]]:
    """The `--loras` values: file paths (or `none`) -> (tag name per value or None, stem -> path)."""
    names: list[str | None] = []
    explicit: dict[str, Path] = {}
    for value in values:
        if value.lower() == NONE:
            names.append(None)
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise WorkbenchError(f"--loras {value}: no such file (a LoRA file, or none)")
        stem = path.stem
        if stem in explicit and explicit[stem].resolve() != path.resolve():
            raise WorkbenchError(f"--loras: {explicit[stem]} and {path} have the same name {stem}")
        explicit[stem] = path
        names.append(stem)
    return names, explicit


# --- checking before rendering --------------------------------------------------------------------


_bindings: dict[tuple[str, str], object] = {}


def binding_for(lora_path: Path, checkpoint: Path):
    """The LoRA bound to a checkpoint's header (family, names and shapes checked; no tensor read).
    WorkbenchError names both files when the LoRA is for another family."""
    from workbench.checkpoint.lora_format import open_lora
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.lora.bake import bind_lora
    from workbench.pipeline import model_spec

    key = (str(Path(lora_path).resolve()), str(Path(checkpoint).resolve()))
    if key not in _bindings:
        lora = open_lora(lora_path)
        with open_checkpoint(checkpoint) as ckpt:
            layout = model_spec(ckpt).layout
            _bindings[key] = bind_lora(lora, dict(ckpt.infos), str(checkpoint), layout)
    return _bindings[key]


def cell_loras(prompt: str, lookup: LoraLookup) -> tuple[tuple[str, float, float], ...]:
    """The LoRAs a cell's prompt asks for, resolved: ((path, te, unet), ...), in tag order."""
    try:
        _, tags = parse_lora_tags(prompt)
    except ValueError as e:
        raise WorkbenchError(f"prompt {prompt!r}: {e}") from None
    return tuple((str(lookup.resolve(t.name)), t.te, t.unet) for t in tags)


# --- PNG info -------------------------------------------------------------------------------------


_hashes: dict[str, str] = {}


def lora_short_hash(path: str) -> str:
    """A1111's Lora hash: the first 12 hex digits of sshs_model_hash (the sha256 of the tensor data),
    computed from the file when its metadata lacks it."""
    if path not in _hashes:
        from workbench.checkpoint.lora_format import data_sha256
        from workbench.checkpoint.reader import open_checkpoint

        with open_checkpoint(path) as ckpt:
            full = ckpt.metadata.get("sshs_model_hash")
        _hashes[path] = (full or data_sha256(path))[:12]
    return _hashes[path]


def lora_hashes_field(prompt: str, loras: tuple[tuple[str, float, float], ...]) -> dict[str, str]:
    """{"Lora hashes": "name: hash, ..."} for a cell with LoRAs (names as its prompt tags say them)."""
    if not loras:
        return {}
    _, tags = parse_lora_tags(prompt)
    parts = [f"{t.name}: {lora_short_hash(path)}" for t, (path, _, _) in zip(tags, loras, strict=True)]
    return {"Lora hashes": ", ".join(dict.fromkeys(parts))}


# --- applying in place ----------------------------------------------------------------------------


def _no_grad(method):
    """torch.no_grad() around a method, importing torch only when it runs: `wb` imports this module
    at start, and a command that refuses its input must not wait 2 s for torch."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)

    return run


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule("text_model." + path)  # transformers 4's nested CLIP, or TE2


class LoraState:
    """The LoRAs applied to one pipeline's weights, with the original tensors of what they touch.

    A switch touches only the modules whose LoRA contributions change: each gets
    `original + sum(m * dW)` (float32, cast to the weight's dtype); a module no LoRA touches any
    more gets its original back. Originals and the LoRA factors are kept on the weights' device
    (the originals cost the size of the touched weights: ~31% of an SD1.5 UNet, 86% of SDXL's)."""

    def __init__(self, pipe, checkpoint: Path):
        self.pipe, self.checkpoint = pipe, Path(checkpoint)
        self.active: tuple[tuple[str, float, float], ...] = ()
        self.backup: dict[tuple[str, str, str], torch.Tensor] = {}
        # (component, module, "weight" or "bias") -> ((lora, module name, m), ...)
        self.specs: dict[tuple[str, str, str], tuple] = {}
        self.factors: dict[tuple[str, str], dict] = {}
        self.text_encoder_changed = False  # whether the text encoders hold LoRA changes now

    def use_checkpoint(self, checkpoint: Path) -> None:
        """Before another checkpoint's weights are loaded into the pipeline: originals back first."""
        self.restore()
        self.checkpoint = Path(checkpoint)

    @_no_grad
    def restore(self) -> None:
        for (component, path, param), original in self.backup.items():
            getattr(_module(getattr(self.pipe, component), path), param).copy_(original)
        self.backup.clear()
        self.specs.clear()
        self.active = ()
        self.text_encoder_changed = False

    def _delta(self, lora_path: str, binding, module, weight: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * up @ down of one module, float32 on the weight's device (factors cached)."""
        import torch

        from workbench.lora import math as lm

        if module.kind != "lora":  # LoHa / LoKr: through the file's own math
            return binding.lora.delta(module, tuple(weight.shape)).to(weight.device)
        key = (lora_path, module.name)
        if key not in self.factors:
            t = {r: binding.lora.tensor(module, r).to(weight.device, torch.float32)
                 for r in module.keys if r != "alpha"}  # fmt: skip
            if not all(torch.isfinite(v).all() for v in t.values()):
                raise WorkbenchError(f"{lora_path}: module {module.name} holds non-finite values")
            self.factors[key] = {**t, "alpha": binding.lora.alpha(module)}
        f = self.factors[key]
        return lm.lora_delta(f["up"], f["down"], f["alpha"], tuple(weight.shape), f.get("mid"))

    @_no_grad
    def apply(self, loras: tuple[tuple[str, float, float], ...]) -> bool:
        """Make `loras` the applied set. Returns whether the text encoders' weights changed (the
        caller's prompt embeddings are then stale)."""
        if loras == self.active:
            return False
        wanted: dict[tuple[str, str, str], list] = {}
        for path, te, unet in loras:
            binding = binding_for(Path(path), self.checkpoint)
            for pairs in binding.by_key.values():
                for module, target in pairs:
                    m = unet if target.component == "unet" else te
                    if m != 0:
                        key = (target.component, target.module, target.param)
                        wanted.setdefault(key, []).append((path, binding, module, m))
        specs = {k: tuple((p, mod.name, m) for p, _, mod, m in v) for k, v in wanted.items()}
        te_changed = False
        for key in [k for k in self.backup if k not in wanted]:  # no LoRA on it any more
            getattr(_module(getattr(self.pipe, key[0]), key[1]), key[2]).copy_(self.backup.pop(key))
            te_changed |= key[0] != "unet"
        for key, contributions in wanted.items():
            if self.specs.get(key) == specs[key]:
                continue  # the same LoRAs at the same strengths: already in place
            weight = getattr(_module(getattr(self.pipe, key[0]), key[1]), key[2])  # weight or bias
            if key not in self.backup:
                self.backup[key] = weight.detach().clone()
            updated = self.backup[key].float()
            for path, binding, module, m in contributions:
                updated = updated + m * self._delta(path, binding, module, weight)
            weight.copy_(updated)
            te_changed |= key[0] != "unet"
        self.specs, self.active = specs, loras
        self.text_encoder_changed = any(k[0] != "unet" for k in self.backup)
        return te_changed


# --- what the plan calls --------------------------------------------------------------------------


def lora_plan(request) -> tuple[list[str | None], LoraLookup]:
    """The `lora` axis values (tag names, None for none) and the lookup for every cell's tags."""
    loras = [NONE if v is None else str(v) for v in request.extra.get("lora", [])]
    weights = request.extra.get("lora_weight", [1.0])
    if [float(w) for w in weights] != [1.0] and not loras:
        raise WorkbenchError("--lora-weight: sets the strength of the --loras LoRAs; give --loras too")
    names, explicit = axis_loras(loras) if loras else ([None], {})
    first = request.checkpoints[0] if request.checkpoints else None
    return names, LoraLookup(explicit, default_folders(list(request.lora_dirs), first))


def with_axis_lora(prompt: str, name: str | None, weight: float) -> str:
    """The prompt with the axis LoRA's tag appended (as a user would write it in A1111)."""
    return prompt if name is None else f"{prompt} {lora_tag(name, weight)}"


def check_cells(cells) -> None:
    pairs = {(c.checkpoint, path) for c in cells for path, _, _ in c.loras}
    for ckpt, path in sorted(pairs, key=str):
        binding_for(Path(path), ckpt)
