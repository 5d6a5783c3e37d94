"""LoRA / LoCon training: small low-rank adapters on a frozen base (the recipe's `network:` section).

Each adapted Linear or Conv2d gets kohya's LoRAModule structure:

    down: Linear [r, in]      | Conv2d [r, in, kh, kw] (the base conv's kernel, stride, padding)
    up:   Linear [out, r]     | Conv2d [out, r, 1, 1]
    y = base(x) + multiplier * (alpha / r) * up(dropout(down(x)))

down starts kaiming-uniform (a = sqrt(5)), up at zero, so step 0 is the base exactly. Dropout acts
on the rank-space activation, as kohya's `network_dropout`, and only while the base module is in
training mode (validation and samples see no dropout).

Why wb's own layer and not peft's `inject_adapter_in_model`: the layer is the ~40 lines below and
is tensor-for-tensor the kohya file (names, shapes, alpha as a 0-dim buffer), so saving is a
rename-free copy and resuming is a plain state dict. peft would add a dependency to training for
the same arithmetic, would apply its dropout to the input instead of the rank activation, and
would rename the base modules' parameters (`base_layer.weight`), which the single-file writer,
EMA and sampling would then have to undo. peft stays a test-only oracle: diffusers'
`load_lora_weights` (which needs it) must read the files wb writes.

The adapters do not replace modules: the base module's `forward` is wrapped in place, so the
base's state dict, its parameter names and everything that reads them (checkpoint writer,
validation, samples) are untouched, and samples during training see the LoRA as it is.

Module names are kohya's (workbench/lora/names.py): SD1/SD2 UNet by diffusers path, SDXL UNet by
LDM path, text encoders `lora_te(1|2)_text_model_...`. The network's state dict holds exactly the
kohya keys (`NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LoRAModule(torch.nn.Module):
    """One adapter around a base Linear/Conv2d, whose forward it wraps (see the module docstring)."""

    def __init__(self, base: torch.nn.Module, dim: int, alpha: float, dropout: float, generator):
        super().__init__()
        w = base.weight
        if isinstance(base, torch.nn.Linear):
            self.lora_down = torch.nn.Linear(base.in_features, dim, bias=False)
            self.lora_up = torch.nn.Linear(dim, base.out_features, bias=False)
        elif isinstance(base, torch.nn.Conv2d):
            self.lora_down = torch.nn.Conv2d(base.in_channels, dim, base.kernel_size, base.stride,
                                             base.padding, bias=False)  # fmt: skip
            self.lora_up = torch.nn.Conv2d(dim, base.out_channels, 1, 1, bias=False)
        else:
            raise TypeError(f"cannot adapt a {type(base).__name__}")
        with torch.no_grad():  # on the CPU generator, then moved: the same numbers on every device
            torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            torch.nn.init.zeros_(self.lora_up.weight)
        self.lora_down.to(w.device, torch.float32)
        self.lora_up.to(w.device, torch.float32)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dim, self.scale, self.dropout, self.multiplier = dim, alpha / dim, dropout, 1.0
        self.index, self.network_seed = 0, None  # set by LoRANetwork.add
        self._base = [base]  # a list: not a submodule (its weights are not the network's)
        self._base_forward = base.forward
        base.forward = self.forward

    def forward(self, x, *args, **kwargs):
        out = self._base_forward(x, *args, **kwargs)
        h = self.lora_down(x)
        if self.dropout and self._base[0].training and self.network_seed is not None:
            # the mask comes from a seed drawn once per forward of the whole model (see LoRANetwork):
            # the same under gradient checkpointing's recompute and after a resume
            g = torch.Generator(device=h.device).manual_seed(self.network_seed[0] + self.index)
            keep = torch.rand(h.shape, generator=g, device=h.device) >= self.dropout
            h = h * keep.to(h.dtype) / (1 - self.dropout)
        return out + (self.lora_up(h) * (self.multiplier * self.scale)).to(out.dtype)

    def remove(self) -> None:
        """Give the base module its own forward back."""
        base = self._base[0]
        if base.__dict__.get("forward") is not None:
            del base.forward

    def delta(self) -> torch.Tensor:
        """(alpha / r) * up @ down in the base weight's shape, float32 (what baking adds)."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        d = (up.flatten(1) @ down.flatten(1)).reshape(self._base[0].weight.shape)
        return d * self.scale


@dataclass(frozen=True)
class Target:
    component: str  # unet | text_encoder | text_encoder_2
    path: str  # module path in the diffusers/transformers model
    name: str  # kohya module name
    conv3x3: bool  # a conv with a kernel larger than 1x1 (LoCon's conv_dim/conv_alpha)


class LoRANetwork(torch.nn.Module):
    """Every adapter of a run, by kohya name. `state_dict()` is the kohya file's tensors."""

    def __init__(self, family: str, components: dict[str, str]):
        super().__init__()
        self.family = family
        self.modules_by_name = torch.nn.ModuleDict()
        self.component_of = components  # kohya name -> component
        # Dropout masks: each forward of a trained component (in training mode) draws one seed from
        # `generator` (the loop's training generator, saved and restored by a resume); every module
        # seeds its mask from it and its own index.
        self.generator: torch.Generator | None = None
        self.seed = [0]
        self._hooks: list = []

    def add(self, name: str, component: str, module: LoRAModule) -> None:
        module.index, module.network_seed = 7919 * len(self.modules_by_name), self.seed
        self.modules_by_name[name] = module
        self.component_of[name] = component

    def watch(self, model: torch.nn.Module) -> None:
        """Draw the dropout seed at every training-mode forward of `model` (a whole UNet or TE)."""

        def draw(module, args):
            if module.training and self.generator is not None:
                self.seed[0] = int(torch.randint(0, 2**62, (1,), generator=self.generator))

        self._hooks.append(model.register_forward_pre_hook(draw))

    def params(self) -> dict[str, list[torch.nn.Parameter]]:
        """component -> its adapters' parameters (down then up of each module, in order)."""
        out: dict[str, list[torch.nn.Parameter]] = {}
        for name, m in self.modules_by_name.items():
            out.setdefault(self.component_of[name], []).extend([m.lora_down.weight, m.lora_up.weight])
        return out

    def param_names(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.modules_by_name:
            out.setdefault(self.component_of[name], []).extend(
                [f"{name}.lora_down.weight", f"{name}.lora_up.weight"]
            )
        return out

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """NAME.lora_down.weight / NAME.lora_up.weight / NAME.alpha, as kohya names them."""
        return {k.removeprefix("modules_by_name."): v for k, v in self.state_dict().items()}

    def load_kohya_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        mine = self.kohya_state()
        if mine.keys() != tensors.keys() or any(mine[k].shape != tensors[k].shape for k in mine):
            missing, extra = len(mine.keys() - tensors.keys()), len(tensors.keys() - mine.keys())
            raise WorkbenchError(
                f"{source}: does not fit this run's network ({missing} missing, {extra} unexpected "
                "or resized tensors); was the network section changed?"
            )
        with torch.no_grad():
            for k, v in tensors.items():
                mine[k].copy_(v)

    def remove(self) -> None:
        for m in self.modules_by_name.values():
            m.remove()
        for h in self._hooks:
            h.remove()


def _layers_per_block(config) -> int:
    n = config.get("layers_per_block", 2)
    return n[0] if isinstance(n, (list, tuple)) else int(n)


def find_targets(models, family: str, unet_config, network, components: list[str]) -> list[Target]:
    """The modules the network section adapts, in model order. Errors name the field."""
    from workbench.lora.names import UNET_ATTN_RE, UNET_CONV_RE, kohya_names_for_diffusers

    patterns = network.targets if isinstance(network.targets, list) else None
    matched = [False] * len(patterns or [])
    out: list[Target] = []
    for component in components:
        model = getattr(models, component)
        keys = list(model.state_dict().keys())
        names = kohya_names_for_diffusers(component, keys, family, _layers_per_block(unet_config))
        for path, module in model.named_modules():
            if path not in names or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            conv3x3 = isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
            if patterns is None:
                if component == "unet":
                    wanted = bool(UNET_ATTN_RE.fullmatch(path)) or (
                        network.type == "locon" and bool(UNET_CONV_RE.fullmatch(path))
                    )
                else:
                    wanted = True  # the text encoders' names are exactly kohya's q/k/v/out/fc1/fc2
            else:
                hits = [i for i, p in enumerate(patterns) if re.fullmatch(p, path)]
                for i in hits:
                    matched[i] = True
                wanted = bool(hits)
            if wanted:
                out.append(Target(component, path, names[path], conv3x3))
    for i, ok in enumerate(matched):
        if not ok:
            raise WorkbenchError(
                f"network.targets.{i}: {patterns[i]!r} matches no adaptable module of the "
                f"{', '.join(components)} (patterns are regexes over diffusers module paths, "
                "e.g. down_blocks\\.\\d+\\.attentions\\..*to_q)"
            )
    if not out:
        raise WorkbenchError(f"network.targets: no module of the {', '.join(components)} to adapt")
    return out


def build_network(models, family: str, unet_config, recipe) -> LoRANetwork:
    """Freeze the base, wrap every target with an adapter; returns the network (its params train).

    Which components get adapters: those the recipe trains (`recipe.trains`), text_encoder_2 with
    text_encoder on SDXL."""
    net = recipe.network
    for component in ("unet", *TEXT_ENCODERS):
        module = getattr(models, component, None)
        if module is not None:
            module.requires_grad_(False)
    components = [c for c in ("unet", *TEXT_ENCODERS) if getattr(models, c, None) is not None
                  and recipe.trains(c)]  # fmt: skip
    targets = find_targets(models, family, models.unet.config, net, components)
    seed = net.init_seed if net.init_seed is not None else recipe.training.seed
    generator = torch.Generator().manual_seed(seed)
    network = LoRANetwork(family, {})
    for t in targets:
        base = getattr(models, t.component).get_submodule(t.path)
        dim, alpha = net.dim, net.resolved_alpha
        if net.type == "locon" and t.conv3x3:
            dim, alpha = net.resolved_conv_dim, net.resolved_conv_alpha
        lora = LoRAModule(base, dim, alpha, net.dropout, generator)
        network.add(t.name, t.component, lora)
    if net.dropout:
        for component in components:
            network.watch(getattr(models, component))
    return network


def alpha_warning(network_section) -> str | None:
    """The seed-002 pitfall, said once at the start: a small alpha/dim shrinks every update."""
    ratio = network_section.resolved_alpha / network_section.dim
    if ratio < 1 / 8:
        return (
            f"network.alpha {network_section.resolved_alpha:g} / dim {network_section.dim} = {ratio:.3g}: "
            "every LoRA update is scaled down by that much (adaptive optimizers push d*lr up to compensate; "
            "seed 002's guide keeps alpha = dim)"
        )
    return None


# --- saving -------------------------------------------------------------------------------------


def network_metadata(recipe, family: str, run: dict, v_prediction: bool = False) -> dict[str, str]:
    """kohya's `ss_*` training keys and the `modelspec.*` keys for a LoRA written by a wb run.

    `run`: name, step, epoch, total_steps, started (ISO time), base_path, base_sha256, examples,
    resolution."""
    import json

    from workbench.checkpoint.lora_format import kohya_metadata

    net, tr, opt = recipe.network, recipe.training, recipe.optimizer
    unet, te = opt.settings("unet"), opt.settings("text_encoder")
    shown = ("decouple", "weight_decay", "betas", "d0")
    options = ",".join(f"{k}={v}" for k, v in unet.options.items() if k in shown)
    extra = {
        "ss_session_id": str(run.get("session_id", "")),
        "ss_training_started_at": str(run.get("started", "")),
        "ss_output_name": run["name"],
        "ss_steps": str(run["step"]),
        "ss_epoch": str(run["epoch"]),
        "ss_max_train_steps": str(run["total_steps"]),
        "ss_seed": str(tr.seed),
        "ss_learning_rate": str(unet.lr),
        "ss_unet_lr": str(unet.lr if recipe.trains("unet") else 0.0),
        "ss_text_encoder_lr": str(te.lr if recipe.trains("text_encoder") else 0.0),
        "ss_lr_scheduler": recipe.schedule.name,
        "ss_lr_warmup_steps": str(recipe.schedule.warmup_steps),
        "ss_optimizer": f"{run.get('optimizer_class') or unet.name}({options})",
        "ss_network_dropout": str(net.dropout),
        "ss_num_train_images": str(run.get("examples", "")),
        "ss_batch_size_per_device": str(tr.batch_size),
        "ss_gradient_accumulation_steps": str(tr.grad_accum),
        "ss_total_batch_size": str(tr.batch_size * tr.grad_accum),
        "ss_resolution": f"({recipe.data.resolution}, {recipe.data.resolution})",
        "ss_noise_offset": str(tr.zero_frequency_noise_ratio or "None"),
        "ss_min_snr_gamma": str(tr.min_snr_gamma),
        "ss_max_grad_norm": str(tr.clip_grad_norm),
        "ss_mixed_precision": str(run.get("mixed_precision") or tr.mixed_precision),
        "ss_sd_model_name": str(run.get("base_name", "")),
        "ss_new_sd_model_hash": str(run.get("base_sha256") or ""),
        "ss_training_comment": f"wb train, network {json.dumps(net.model_dump(mode='json'), sort_keys=True)}",
    }
    locon = net.type == "locon"
    return kohya_metadata(
        family,
        net.dim,
        net.resolved_alpha,
        conv_dim=net.resolved_conv_dim if locon else None,
        conv_alpha=net.resolved_conv_alpha if locon else None,
        v_prediction=v_prediction,
        title=run.get("title") or run["name"],
        extra=extra,
    )


def save_network(path, network: LoRANetwork, metadata: dict[str, str], dtype: str = "fp16"):
    """The adapters as one kohya LoRA file (lora_format's writer: temp file + rename, hashes)."""
    from workbench.checkpoint.lora_format import KohyaModule, write_kohya

    modules = {
        name: KohyaModule(up=m.lora_up.weight.detach().cpu(), down=m.lora_down.weight.detach().cpu(),
                          alpha=float(m.alpha))  # fmt: skip
        for name, m in network.modules_by_name.items()
    }
    return write_kohya(path, modules, metadata, dtype={"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[dtype])


# --- what the loop calls --------------------------------------------------------------------------


def start_network(models, spec, recipe, accelerator):
    """Build the run's LoRA network on the loaded models; returns (network, params by component)."""
    if accelerator.num_processes > 1:
        raise WorkbenchError("network: LoRA runs train on one process (one GPU) for now")
    if recipe.saving.format != ["single_file"]:
        raise WorkbenchError("saving.format: a LoRA run writes kohya LoRA files; use [single_file]")
    for section in ("text_encoder", "text_encoder_2"):
        te = recipe.text_encoder_section(section)
        for name in (
            "unfreeze_last_n_layers", "freeze_first_n_layers", "freeze_embeddings", "freeze_final_layer_norm"
        ):  # fmt: skip  # (freeze_embeddings auto freezes only with frozen layers: harmless here)
            if getattr(te, name) not in (None, False, "auto"):
                raise WorkbenchError(
                    f"{section}.{name}: the base is frozen in a LoRA run; choose the adapted modules "
                    "with network.targets instead"
                )
    family = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}[spec.layout]
    network = build_network(models, family, models.unet.config, recipe)
    params = network.params()
    return network, {c: params[c] for c in ("unet", *TEXT_ENCODERS) if c in params}


def network_record(network: LoRANetwork, recipe) -> dict:
    """What run.json says about the network: the resolved section and what it adapts."""
    counts: dict[str, int] = {}
    params: dict[str, int] = {}
    for name, m in network.modules_by_name.items():
        c = network.component_of[name]
        counts[c] = counts.get(c, 0) + 1
        params[c] = params.get(c, 0) + m.lora_down.weight.numel() + m.lora_up.weight.numel()
    net = recipe.network
    return {
        "section": net.model_dump(mode="json"),
        "alpha": net.resolved_alpha,
        "scale": net.resolved_alpha / net.dim,
        "family": network.family,
        "modules": counts,
        "params": params,
    }


def network_run_info(run_dir, examples: int) -> dict:
    """The ss_* facts about the run that do not change between checkpoints (from run.json)."""
    import uuid

    from workbench.train.runs import read_run

    record = read_run(run_dir)
    base = record.get("base", {})
    return {
        "session_id": uuid.uuid5(uuid.NAMESPACE_URL, str(run_dir)).hex,
        "started": record.get("started", ""),
        "base_name": str(base.get("path", "")).rsplit("/", 1)[-1],
        "base_sha256": base.get("sha256"),
        "examples": examples,
        "optimizer_class": record.get("optimizers", {}).get("unet", {}).get("class"),
        "mixed_precision": record.get("device", {}).get("mixed_precision"),
    }


def check_network_unchanged(run_dir, recipe) -> None:
    """A resumed LoRA run must have the network it started with (run.json's network.section)."""
    from workbench.train.runs import read_run

    started = read_run(run_dir).get("network", {}).get("section")
    now = recipe.network.model_dump(mode="json") if recipe.network is not None else None
    if started != now:
        raise WorkbenchError(
            f"{run_dir}: network: the recipe's network section differs from the one the run started with "
            f"(run.json network.section: {started}); a resumed run keeps its network"
        )
