"""What a LoRA file is: kind, base family, format, ranks and alphas per family of modules, training
metadata (kohya's `ss_*`), hashes (sha256, AutoV2, kohya's `sshs_model_hash`). Reads the header, the
alpha scalars and (for the hashes) the file once."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.checkpoint.hashing import autov2, sha256_file
from workbench.checkpoint.lora_format import LoraFile, LoraModule, data_sha256, lora_family, open_lora

# Training metadata worth a line of its own, in this order (LORA.md 1.3).
TRAINING_KEYS = (
    "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_sd_model_name", "ss_new_sd_model_hash", "ss_optimizer", "ss_learning_rate",
    "ss_unet_lr", "ss_text_encoder_lr", "ss_lr_scheduler", "ss_epoch", "ss_num_epochs", "ss_steps",
    "ss_max_train_steps", "ss_num_train_images", "ss_batch_size_per_device", "ss_resolution",
    "ss_mixed_precision", "ss_noise_offset", "ss_min_snr_gamma", "ss_clip_skip", "ss_seed",
    "ss_training_started_at", "ss_training_finished_at", "ss_training_comment",
)  # fmt: skip


@dataclass
class ModuleGroup:
    """A family of modules (UNet, UNet conv, TE, TE1, TE2): how many, their ranks and alphas."""

    modules: int
    params: int
    ranks: dict[str, int]  # rank -> modules
    alphas: dict[str, int]  # alpha -> modules ("none": alpha = rank)
    scales: dict[str, int]  # alpha/rank -> modules


@dataclass
class LoraDescription:
    path: str
    kind: str  # lora | locon | loha | lokr | mixed
    format: str  # kohya | diffusers
    family: str | None
    family_from: str  # keys | metadata | unknown
    metadata_family: str | None
    modules: int
    conv_modules: int  # modules with a kernel larger than 1x1
    groups: dict[str, ModuleGroup]
    dtypes: dict[str, int]  # dtype -> parameters
    params: int
    size_bytes: int
    metadata: dict[str, str]
    training: dict[str, str]  # the ss_* keys worth showing, in order
    tags: list[tuple[str, int]]  # the most frequent dataset tags (ss_tag_frequency), summed over folders
    tag_count: int
    # LyCORIS full/norm modules and diff_b bias changes (counts), and their parameters
    extras: dict[str, int] = field(default_factory=dict)
    extra_params: int = 0
    sha256: str | None = None
    autov2: str | None = None
    sshs_model_hash: str | None = None  # computed from the file
    sshs_recorded: str | None = None  # as the file's metadata says

    def to_json(self) -> dict:
        d = asdict(self)
        d["tags"] = [list(t) for t in self.tags]
        return d


def group_of(name: str) -> str:
    if name.startswith("lora_te1_"):
        return "TE1"
    if name.startswith("lora_te2_"):
        return "TE2"
    if name.startswith("lora_te_"):
        return "TE"
    return "UNet"


def _fmt(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:g}"


def describe_lora(
    path: str | os.PathLike | LoraFile, with_hash: bool = True, top_tags: int = 10
) -> LoraDescription:
    lora = path if isinstance(path, LoraFile) else open_lora(path)
    family, how = lora_family(lora)
    from workbench.checkpoint.lora_format import family_from_metadata

    groups: dict[str, ModuleGroup] = {}
    dtypes: Counter[str] = Counter()
    params = 0
    extras: Counter[str] = Counter()
    extra_params = 0
    for name, m in lora.modules.items():
        if m.bias_role is not None and m.kind not in ("full", "norm"):
            extras["diff_b"] += 1
            extra_params += m.infos[m.bias_role].numel
        if m.kind in ("full", "norm"):
            extras[m.kind] += 1
            extra_params += sum(i.numel for r, i in m.infos.items() if r != "alpha")
        g = group_of(name) + (" conv" if m.is_conv and group_of(name) == "UNet" else "")
        g += f" {m.kind}" if m.kind in ("full", "norm") else ""
        grp = groups.setdefault(g, ModuleGroup(0, 0, {}, {}, {}))
        n = sum(i.numel for r, i in m.infos.items() if r != "alpha")
        grp.modules += 1
        grp.params += n
        params += n
        for r, i in m.infos.items():
            if r != "alpha":
                dtypes[i.dtype] += i.numel
        rank = m.rank
        alpha = lora.alpha(m)
        _count(grp.ranks, m.kind if m.kind in ("full", "norm") else str(rank))
        _count(grp.alphas, _fmt(alpha))
        _count(grp.scales, _fmt(_scale(m, alpha)))
    meta = lora.metadata
    training = {k: meta[k] for k in TRAINING_KEYS if k in meta}
    tags, tag_count = _tags(meta.get("ss_tag_frequency"), top_tags)
    size = lora.path.stat().st_size
    digest = sha256_file(lora.path) if with_hash else None
    return LoraDescription(
        path=str(lora.path),
        kind=lora.kind,
        format=lora.format,
        family=family,
        family_from=how,
        metadata_family=family_from_metadata(meta),
        modules=len(lora.modules),
        conv_modules=sum(1 for m in lora.modules.values() if m.is_conv),
        groups=dict(sorted(groups.items())),
        dtypes=dict(dtypes),
        params=params,
        size_bytes=size,
        metadata=dict(meta),
        training=training,
        tags=tags,
        tag_count=tag_count,
        extras=dict(extras),
        extra_params=extra_params,
        sha256=digest,
        autov2=autov2(digest) if digest else None,
        sshs_model_hash=data_sha256(lora.path) if with_hash else None,
        sshs_recorded=meta.get("sshs_model_hash"),
    )


def _scale(m: LoraModule, alpha: float | None) -> float | None:
    rank = m.rank
    if not rank:
        return 1.0
    return 1.0 if alpha is None or alpha == 0 else alpha / rank


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


def _tags(raw: str | None, top: int) -> tuple[list[tuple[str, int]], int]:
    """ss_tag_frequency is {folder: {tag: count}}; summed over folders, the `top` most frequent."""
    if not raw:
        return [], 0
    try:
        doc = json.loads(raw)
    except ValueError:
        return [], 0
    total: Counter[str] = Counter()
    if isinstance(doc, Mapping):
        for folder in doc.values():
            if isinstance(folder, Mapping):
                for tag, n in folder.items():
                    if isinstance(n, (int, float)):
                        total[str(tag).strip()] += int(n)
    return total.most_common(top), len(total)


def is_lora(path: str | os.PathLike) -> bool:
    from workbench.checkpoint.lora_format import is_lora_file

    p = Path(path)
    return p.is_file() and is_lora_file(p)
