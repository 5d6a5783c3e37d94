"""`wb lora extract`: a LoRA from a fine-tune, per module the best low-rank approximation of
(tuned - base) (LORA.md 2d).

Per module, in float32: D = W_tuned - W_base (OpenCLIP q/k/v: their row slices; convs flattened
to [out, in*kh*kw]); SVD; up = U_r * S_r, down = Vh_r, alpha = r unless told (then up is rescaled
so that (alpha / r) * up @ down is unchanged). No quantile clamp unless asked: kohya's 0.99 clamp
adds 9-15% error even to an exactly low-rank difference. Reported per module and overall: the share
of the difference's Frobenius norm the rank keeps, sqrt(sum S[:r]^2 / sum S^2).

Modules follow kohya's selection (names.py groups): the transformer modules of the UNet ("attn")
and the text encoder layers ("te"); with a conv rank, also the ResNet and sampler modules ("conv":
3x3 kernels at the conv rank, linear and 1x1 ones at the rank, as kohya's LoRA-C3Lier does).
Tensors are read one module at a time from the memory-mapped inputs.

Extras (on unless `extras=False`, the CLI's `--lora-only`): what no low-rank module can hold, in the
keys ComfyUI and A1111 read (docs/lora.md has the table, from their source): `NAME.diff_b` for the
bias change of a module written above, LyCORIS "norm" modules (`w_norm` + `b_norm`) for the UNet's
GroupNorm/LayerNorm layers and LyCORIS "full" modules (`diff` + `diff_b`) for conv_in, conv_out and
the time/add embedding linears. Exact (no SVD), tiny, skipped where the difference is exactly zero.
A1111 accepts a module only as a whole (a lone `diff_b`, or `w_norm` without `b_norm`, makes it refuse
the file), so norms always carry both tensors and a bias change on a module whose weight did not
change is written as `diff` (zeros) + `diff_b`. ResNet convs stay out unless a conv rank is given,
and with them their biases. diffusers' `load_lora_weights` refuses files with these keys.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.checkpoint.describe import detect_architecture
from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.lora_format import KohyaModule, kohya_metadata, write_kohya
from workbench.checkpoint.reader import open_checkpoint, with_current_key_names
from workbench.errors import WorkbenchError
from workbench.lora import math as lm
from workbench.lora.names import Target, lora_targets

COMPONENTS = {"unet": ("unet",), "te": ("text_encoder", "text_encoder_2")}


@dataclass
class ModuleReport:
    name: str
    rank: int
    kept: float  # share of the module difference's Frobenius norm kept
    norm: float  # Frobenius norm of the difference


@dataclass
class ExtractResult:
    path: Path
    family: str
    modules: list[ModuleReport]
    kept: float  # overall: sqrt(sum kept energy / sum energy)
    skipped_zero: int  # modules whose difference is exactly zero (not written)
    te_dropped: bool  # the text encoders differ by at most min_diff: left out
    seconds: float
    zeroed: int  # entries cast to exact zero in the save dtype
    metadata: dict[str, str] = field(default_factory=dict)
    # Without a conv rank: the share of the LoRA-able difference's energy (squared Frobenius norm)
    # that sits in the ResNet/sampler convs left out (kohya's LoCon modules); None when they are in.
    conv_share: float | None = None
    extras: dict[str, int] = field(default_factory=dict)  # "full" / "norm" modules, "diff_b" biases
    extra_bytes: int = 0
    # Of the whole difference of the extracted components (every float tensor, squared Frobenius
    # norm): the share the file holds (low-rank part as kept + extras), and what it leaves out by kind.
    file_share: float = 1.0
    left_out: dict[str, float] = field(default_factory=dict)


def _diff(tuned, base, t: Target) -> torch.Tensor:
    a = tuned[t.key].to(torch.float32)
    b = base[t.key].to(torch.float32)
    if t.rows is not None:
        lo, hi = t.rows
        a, b = a[lo:hi], b[lo:hi]
    d = a - b
    return d.T.contiguous() if t.transpose else d


def extract(
    tuned_path: str | os.PathLike,
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    rank: int,
    conv_rank: int | None = None,
    components: Iterable[str] = ("unet", "te"),
    alpha: float | None = None,
    conv_alpha: float | None = None,
    method: str = "auto",
    clamp_quantile: float | None = None,
    min_diff: float = 0.0,
    dtype: str = "F16",
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
    extras: bool = True,
) -> ExtractResult:
    started = time.perf_counter()
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise WorkbenchError(f"--rank {rank}, --conv-rank {conv_rank}: ranks must be at least 1")
    comps = set()
    for c in components:
        if c not in COMPONENTS:
            raise WorkbenchError(f"--components: unknown component {c!r} (unet, te)")
        comps.update(COMPONENTS[c])
    tuned = with_current_key_names(open_checkpoint(tuned_path))
    base = with_current_key_names(open_checkpoint(base_path))
    out = Path(out_path)
    try:
        _, t_layout, variants = _arch(tuned)
        _, b_layout, _ = _arch(base)
        if t_layout != b_layout:
            raise WorkbenchError(
                f"{tuned.path} is {t_layout}, {base.path} is {b_layout}: not the same architecture"
            )
        family = t_layout
        if family not in ("sd1", "sd2", "sdxl"):
            raise WorkbenchError(
                f"{tuned.path}: LoRAs are extracted from sd1, sd2 or sdxl checkpoints, not {family}"
            )
        groups = {"attn", "te"} | ({"conv"} if conv_rank else set())
        all_targets = lora_targets(base.infos, family)
        targets = [t for t in all_targets.values() if t.group in groups and t.component in comps]
        left_out = [
            t for t in all_targets.values() if t.group == "conv" and not conv_rank and "unet" in comps
        ]
        extra_targets = [
            t for t in all_targets.values()
            if extras and "unet" in comps and t.component == "unet" and t.group in ("norm", "extra")
        ]  # fmt: skip
        checked = [*targets, *extra_targets]
        if extras:
            checked += [b for t in checked if (b := t.bias_target(base.infos)) is not None]
        for t in checked:  # everything checked from the headers first
            other = tuned.infos.get(t.key)
            if other is None:
                raise WorkbenchError(f"{tuned.path}: no {t.key} (it is in {base.path})")
            if other.shape != base.infos[t.key].shape:
                raise WorkbenchError(
                    f"{t.key}: {list(other.shape)} in {tuned.path}, "
                    f"{list(base.infos[t.key].shape)} in {base.path}"
                )
        if not targets:
            raise WorkbenchError(
                f"{base.path}: no module to extract for components {', '.join(sorted(comps))}"
            )
        te_dropped = False
        te = [t for t in targets if t.component != "unet"]
        if te:
            parts = [*te, *(b for t in te if extras and (b := t.bias_target(base.infos)) is not None)]
            biggest = max(float(_diff(tuned, base, t).abs().max()) for t in parts)
            if biggest <= min_diff:
                te_dropped = True
                targets = [t for t in targets if t.component == "unet"]
        modules: dict[str, KohyaModule] = {}
        reports: list[ModuleReport] = []
        energy = kept_energy = 0.0
        skipped = 0
        measured: dict[str, float] = {}  # LDM key -> energy of its whole difference, once computed
        for i, t in enumerate(targets):
            d = _diff(tuned, base, t)
            is3x3 = t.kind == "conv"
            r = conv_rank if is3x3 else rank
            a = (conv_alpha if is3x3 else alpha) if (conv_alpha if is3x3 else alpha) is not None else None
            norm2 = lm.energy(d)
            if t.rows is None:
                measured[t.key] = norm2
            if norm2 == 0.0:
                skipped += 1
            else:
                low = lm.low_rank(d, r, method=method, clamp_quantile=clamp_quantile, alpha=a, total=norm2)
                modules[t.name] = KohyaModule(low.up, low.down, low.alpha)
                reports.append(ModuleReport(t.name, low.rank, low.kept, norm2**0.5))
                energy += norm2
                kept_energy += norm2 * low.kept**2
            if progress is not None:
                progress(i + 1, len(targets))
        extra_parts, counts, extra_energy = (
            _extras(tuned, base, targets, extra_targets, modules, measured) if extras else ({}, {}, 0.0)
        )
        if not modules and not extra_parts:
            raise WorkbenchError(
                f"{tuned.path} and {base.path} do not differ in any module: nothing to extract"
            )
        overall = (kept_energy / energy) ** 0.5 if energy else 1.0
        conv_share = None
        covered = {t.key for t in targets if t.name in modules}
        for name, parts in extra_parts.items():
            covered.update(_extra_keys(all_targets[name], parts, base.infos))
        if left_out:  # what kohya's default set misses: ResNet convs carry much of a full fine-tune
            for t in left_out:
                measured[t.key] = lm.energy(_diff(tuned, base, t))
            conv_energy = sum(measured[t.key] for t in left_out)
            conv_share = conv_energy / (conv_energy + energy) if conv_energy + energy else 0.0
        total, left_by_kind = _whole_difference(tuned, base, family, comps, covered, all_targets, measured)
        file_share = (kept_energy + extra_energy) / total if total else 1.0
        base_sha = sha256_file(base.path) if base.path.is_file() else None
        tuned_sha = sha256_file(tuned.path) if tuned.path.is_file() else None
        provenance = {
            "tuned": {"path": str(tuned.path.resolve()), "sha256": tuned_sha},
            "base": {"path": str(base.path.resolve()), "sha256": base_sha},
            "rank": rank, "conv_rank": conv_rank, "alpha": alpha, "conv_alpha": conv_alpha,
            "svd": method, "clamp_quantile": clamp_quantile, "min_diff": min_diff,
            "components": sorted(comps), "te_dropped": te_dropped, "fro_kept": round(overall, 6),
            "conv_share_left_out": None if conv_share is None else round(conv_share, 6),
            "extras": counts, "file_share": round(file_share, 6),
        }  # fmt: skip
        extra = {
            "ss_sd_model_name": base.path.name,
            "ss_new_sd_model_hash": base_sha or "",
            "ss_training_comment": f"extracted by wb: {tuned.path.name} - {base.path.name}, rank {rank}",
            "ss_output_name": out.stem,
            "wb.lora_extract": json.dumps(provenance, sort_keys=True),
        }
        if command:
            extra["wb.made_by"] = command
        meta = kohya_metadata(
            family, rank, float(alpha if alpha is not None else rank), conv_dim=conv_rank,
            conv_alpha=float(conv_alpha if conv_alpha is not None else conv_rank) if conv_rank else None,
            v_prediction="v-prediction" in variants, title=out.stem, extra=extra,
        )  # fmt: skip
        written = write_kohya(out, modules, meta, dtype, inputs=[tuned.path, base.path], extras=extra_parts)
    finally:
        tuned.close()
        base.close()
    return ExtractResult(out, family, reports, overall, skipped, te_dropped, time.perf_counter() - started,
                         written.zeroed, meta, conv_share, counts, written.extra_bytes, file_share,
                         left_by_kind)  # fmt: skip


def _nonzero(d: torch.Tensor | None) -> bool:
    return d is not None and bool((d != 0).any())


def _extras(tuned, base, targets: list[Target], extra_targets: list[Target], modules: dict, measured: dict):
    """(name -> {suffix: tensor}, counts by kind, their energy): the bias changes of the low-rank
    targets, norm modules and full modules, exact, each only where something changed. The energy
    of every whole tensor read goes into `measured` (key -> energy)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    counts = {"diff_b": 0, "norm": 0, "full": 0}
    def diff(t: Target | None) -> torch.Tensor | None:
        if t is None:
            return None
        d = _diff(tuned, base, t)
        if t.rows is None:
            measured[t.key] = lm.energy(d)
        return d

    for t in targets:
        db = diff(t.bias_target(base.infos))
        if not _nonzero(db):
            continue
        if t.name in modules:
            out[t.name] = {"diff_b": db}
            counts["diff_b"] += 1
        else:  # the weight did not change: a full module, as A1111 accepts no lone diff_b
            out[t.name] = {"diff": torch.zeros(t.shape), "diff_b": db}
            counts["full"] += 1
    for t in extra_targets:
        dw = diff(t)
        db = diff(t.bias_target(base.infos))
        if not (_nonzero(dw) or _nonzero(db)):
            continue
        # A1111 takes a norm module only with both tensors, a full module only with its diff
        w, b = ("w_norm", "b_norm") if t.group == "norm" else ("diff", "diff_b")
        keep_b = db is not None and (t.group == "norm" or _nonzero(db))
        out[t.name] = {w: dw, **({b: db} if keep_b else {})}
        counts["norm" if t.group == "norm" else "full"] += 1
    energy = sum(lm.energy(x) for parts in out.values() for x in parts.values())
    return out, {k: v for k, v in counts.items() if v}, energy


def _extra_keys(t: Target, parts, infos) -> list[str]:
    keys = [t.key] if set(parts) & {"diff", "w_norm"} else []
    bias = t.bias_target(infos)
    return keys + ([bias.key] if bias is not None and set(parts) & {"diff_b", "b_norm"} else [])


def _whole_difference(
    tuned, base, family: str, comps: set[str], covered: set[str], targets, measured: dict[str, float]
) -> tuple:
    """(energy of the whole difference of the extracted components, share left out of the file by
    kind): every float tensor of the UNet / text encoders, the written ones excluded. Tensors
    already in `measured` are not read again."""
    from workbench.lora.names import TEXT_ENCODERS, UNET_PREFIX

    prefixes = {"unet": UNET_PREFIX, **{c: p for c, (p, _, _) in TEXT_ENCODERS[family].items()}}
    wanted = tuple(p for c, p in prefixes.items() if c in comps)
    conv = {k for t in targets.values() if t.group == "conv" for k in (t.key, t.bias_key) if k}
    total, left = 0.0, {}
    for key, info in base.infos.items():
        if not key.startswith(wanted) or info.dtype not in ("F16", "BF16", "F32", "F64"):
            continue
        if key not in tuned.infos or tuned.infos[key].shape != info.shape:
            continue
        e = measured.get(key)
        if e is None:
            e = lm.energy(tuned[key].to(torch.float32) - base[key].to(torch.float32))
        total += e
        if e and key not in covered:
            what = (
                "ResNet/sampler convs" if key in conv
                else "text encoder (norms, embeddings, ...)" if not key.startswith(UNET_PREFIX)
                else "other UNet tensors"
            )  # fmt: skip
            left[what] = left.get(what, 0.0) + e
    return total, {k: v / total for k, v in left.items()} if total else {}


def _arch(ckpt):
    try:
        return detect_architecture(ckpt.infos, ckpt.metadata)
    except WorkbenchError as e:
        raise WorkbenchError(f"{ckpt.path}: {e}") from None
