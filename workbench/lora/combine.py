"""`wb lora resize` and `wb lora merge`: LoRA files in, one kohya LoRA out (LORA.md 2c, 2e).

Resize, per module, in float32: SVD of up @ down (conv flattened); keep k singular values: up = U_k S_k,
down = Vh_k, new alpha = (alpha / r) * k, so the effective scale alpha/rank is unchanged (kohya's
rule). k is the requested rank (never above the module's own), or with `fro` the SMALLEST k whose
truncation keeps that share of the Frobenius norm. kohya's resize_lora keeps one singular value
more than that (k + 1; LORA.md 2e measured it); wb keeps the minimal k, which already meets the
target, unless `plus_one` asks for kohya's count (to match files resized by kohya).

Merge: exact by concatenation along the rank, up = [m_i (alpha_i / r_i) up_i], down = [down_i],
alpha = total rank: up @ down = sum m_i (alpha_i / r_i) up_i @ down_i exactly. Nothing is squared and
nothing is halved, unlike kohya's merge_lora.py (ratio applied to both factors; --concat keeps the
first alpha). With a rank: SVD of that sum per module (kohya's svd_merge_lora without its clamp).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.lora_format import (
    EXTRA_KINDS,
    KohyaModule,
    LoraFile,
    LoraModule,
    kohya_metadata,
    lora_family,
    open_lora,
    write_kohya,
)
from workbench.errors import WorkbenchError
from workbench.lora import math as lm

F32 = torch.float32


@dataclass
class CombineReport:
    path: Path
    modules: int
    ranks: dict[int, int]  # rank -> modules
    kept: float  # overall Frobenius share kept (1.0 for an exact merge)
    worst: tuple[str, float] | None  # the module keeping the least, and its share
    zeroed: int


def _factors(lora: LoraFile, m: LoraModule) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    if m.kind != "lora" or "mid" in m.keys:
        what = "Tucker LoCon (lora_mid)" if m.kind == "lora" else m.kind
        raise WorkbenchError(
            f"{lora.path}: module {m.name} is {what}: wb can bake it, not resize or merge it"
        )
    return lora.tensor(m, "up").to(F32), lora.tensor(m, "down").to(F32), lora.alpha(m)


def _save_dtype(lora: LoraFile, dtype: str | None) -> str:
    if dtype is not None:
        return dtype
    first = next(iter(lora.modules.values()))
    found = first.infos.get("up", first.infos.get(next(iter(first.infos)))).dtype
    return found if found in ("F16", "BF16", "F32") else "F16"


def _kept(reports: list[tuple[str, float, float]]) -> tuple[float, tuple[str, float] | None]:
    energy = sum(n * n for _, n, _ in reports)
    kept = sum(n * n * k * k for _, n, k in reports)
    worst = min(reports, key=lambda r: r[2]) if reports else None
    return ((kept / energy) ** 0.5 if energy else 1.0), ((worst[0], worst[2]) if worst else None)


def resize(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    rank: int | None = None,
    fro: float | None = None,
    plus_one: bool = False,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> CombineReport:
    if rank is None and fro is None:
        raise WorkbenchError("wb lora resize needs --rank R or --fro F (or both: --fro with a rank cap)")
    if rank is not None and rank < 1:
        raise WorkbenchError(f"--rank {rank}: must be at least 1")
    if fro is not None and not 0.0 < fro <= 1.0:
        raise WorkbenchError(f"--fro {fro}: must be in (0, 1]")
    lora = open_lora(in_path)
    try:
        for m in lora.modules.values():  # refuse from the header first
            if m.kind not in EXTRA_KINDS and (m.kind != "lora" or "mid" in m.keys):
                _factors(lora, m)
        modules: dict[str, KohyaModule] = {}
        reports = []
        ranks: dict[int, int] = {}
        extras = _extras(lora, 1.0, lambda n: n)  # whole changes: carried unchanged
        old_ranks = sorted({m.rank for m in lora.modules.values() if m.kind not in EXTRA_KINDS})
        for i, (name, m) in enumerate(lora.modules.items()):
            if m.kind in EXTRA_KINDS:
                continue
            up, down, alpha = _factors(lora, m)
            scale = lm.scale_of(alpha, m.rank)
            shape = _natural_shape(up, down)
            s = lm.factored_svd(up, down)[1]  # singular values of up @ down, without the scale
            cap = min(m.rank, rank) if rank is not None else m.rank
            k = cap if fro is None else lm.pick_rank_fro(s, fro, max_rank=cap, kohya_plus_one=plus_one)
            low = lm.low_rank_factored(up, down, k, shape)  # alpha = k: up @ down truncated
            modules[name] = KohyaModule(low.up, low.down, scale * low.rank)
            reports.append((name, float((s.double() ** 2).sum() ** 0.5) * scale, low.kept))
            ranks[low.rank] = ranks.get(low.rank, 0) + 1
            if progress is not None:
                progress(i + 1, len(lora.modules))
        if not modules:
            raise WorkbenchError(f"{lora.path}: no LoRA module to resize (only full/norm modules)")
        kept, worst = _kept(reports)
        meta = _carried_metadata(lora)
        alphas = {round(mod.alpha, 6) for mod in modules.values()}
        dynamic = len(ranks) > 1 or len(alphas) > 1
        new_dim = "Dynamic" if dynamic else str(next(iter(ranks)))
        meta["ss_network_dim"] = new_dim
        meta["ss_network_alpha"] = "Dynamic" if dynamic else f"{next(iter(alphas)):g}"
        old = "/".join(map(str, old_ranks))
        comment = meta.get("ss_training_comment", "")
        meta["ss_training_comment"] = f"dimension is resized from {old} to {new_dim}; {comment}".rstrip("; ")
        meta["wb.lora_resize"] = json.dumps(
            {
                "from": _source(lora),
                "rank": rank,
                "fro": fro,
                "plus_one": plus_one,
                "fro_kept": round(kept, 6),
            },
            sort_keys=True,
        )
        if command:
            meta["wb.made_by"] = command
        written = write_kohya(
            out_path, modules, meta, _save_dtype(lora, dtype), inputs=[lora.path], extras=extras
        )
    finally:
        lora.close()
    return CombineReport(written.path, len(modules), ranks, kept, worst, written.zeroed)


def _source(lora: LoraFile) -> dict:
    return {"path": str(lora.path.resolve()), "sha256": sha256_file(lora.path)}


def _carried_metadata(lora: LoraFile) -> dict[str, str]:
    """The input's training metadata minus what describes the old tensors; kohya's minimum keys
    filled in when the input had none (a PEFT file)."""
    meta = {
        k: v
        for k, v in lora.metadata.items()
        if not k.startswith(("sshs_", "wb."))
        and k not in ("modelspec.hash_sha256", "lora_adapter_metadata", "format")
    }
    if "ss_base_model_version" not in meta or "modelspec.architecture" not in meta:
        family, _ = lora_family(lora)
        if family is None:
            raise WorkbenchError(f"{lora.path}: cannot tell which model family the LoRA is for")
        defaults = kohya_metadata(family, "", "", title=Path(lora.path).stem)
        meta = {**defaults, **meta}
    return meta


def merge_loras(
    specs: Sequence[tuple[str | os.PathLike, float]],
    out_path: str | os.PathLike,
    rank: int | None = None,
    conv_rank: int | None = None,
    base: str | os.PathLike | None = None,
    dtype: str = "F16",
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> CombineReport:
    """Combine LoRAs at strengths m_i into one file: exact concatenation, or SVD to `rank` (3x3 conv
    modules to `conv_rank`, default `rank`). With `base`, module names are matched through the
    base's names (mixing kohya and diffusers spellings); without, by name as read."""
    if not specs:
        raise WorkbenchError("wb lora merge needs at least one LORA:STRENGTH")
    loras = [open_lora(p) for p, _ in specs]
    try:
        families = {f for f in (lora_family(x)[0] for x in loras) if f is not None}
        if len(families) > 1:
            raise WorkbenchError(
                f"the LoRAs are for different model families ({', '.join(sorted(families))}): cannot merge"
            )
        family = families.pop() if families else None
        rename = _renamer(base, family) if base is not None else None
        for lora in loras:
            for m in lora.modules.values():
                if m.kind not in EXTRA_KINDS and (m.kind != "lora" or "mid" in m.keys):
                    _factors(lora, m)
        order: dict[str, list[tuple[LoraFile, LoraModule, float]]] = {}
        extras: dict[str, dict[str, torch.Tensor]] = {}
        for lora, (_, strength) in zip(loras, specs, strict=True):
            named = (lambda n, lo=lora: rename(lo, n)) if rename else (lambda n: n)
            for name, parts in _extras(lora, strength, named).items():  # whole changes: m_i-weighted sum
                into = extras.setdefault(name, {})
                for role, t in parts.items():
                    if role in into and into[role].shape != t.shape:
                        raise WorkbenchError(f"module {name}: the LoRAs give its {role} different shapes")
                    into[role] = into[role] + t if role in into else t
            for name, m in lora.modules.items():
                if m.kind in EXTRA_KINDS:
                    continue
                key = rename(lora, name) if rename else name
                order.setdefault(key, []).append((lora, m, strength))
        for name in order:
            if set(extras.get(name, {})) & {"diff", "w_norm"}:
                raise WorkbenchError(
                    f"module {name} is a LoRA module in one file and a full change in another"
                )
        modules: dict[str, KohyaModule] = {}
        reports = []
        ranks: dict[int, int] = {}
        for i, (name, parts) in enumerate(order.items()):
            factors = [(*_factors(lo, m), s) for lo, m, s in parts]
            factors = _same_layout(name, factors)
            if rank is None:
                up, down, alpha = lm.merge_concat(factors)
                modules[name] = KohyaModule(up, down, alpha)
                reports.append((name, 1.0, 1.0))
                r = down.shape[0]
            else:
                # the exact sum as one concatenated LoRA, then its SVD from the factors
                up, down, _ = lm.merge_concat(factors)
                shape = _natural_shape(up, down)
                is3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
                low = lm.low_rank_factored(up, down, (conv_rank or rank) if is3x3 else rank, shape)
                modules[name] = KohyaModule(low.up, low.down, low.alpha)
                reports.append((name, float(low.singular.double().norm()), low.kept))
                r = low.rank
            ranks[r] = ranks.get(r, 0) + 1
            if progress is not None:
                progress(i + 1, len(order))
        kept, worst = _kept(reports)
        if family is None:
            raise WorkbenchError(f"{loras[0].path}: cannot tell which model family the LoRAs are for")
        alphas = {round(m.alpha, 6) for m in modules.values()}
        dynamic = len(ranks) > 1 or len(alphas) > 1
        sources = [{**_source(lo), "strength": s} for lo, (_, s) in zip(loras, specs, strict=True)]
        extra = {
            "ss_training_comment": "merged by wb: " + ", ".join(f"{lo.path.name}:{s:g}" for lo, (_, s) in
                                                              zip(loras, specs, strict=True)),
            "modelspec.merged_from": ", ".join(lo.path.stem for lo in loras),
            "ss_output_name": Path(out_path).stem,
            "wb.lora_merge": json.dumps({"sources": sources, "rank": rank, "conv_rank": conv_rank,
                                         "fro_kept": round(kept, 6)}, sort_keys=True),
        }  # fmt: skip
        if command:
            extra["wb.made_by"] = command
        meta = kohya_metadata(
            family,
            "Dynamic" if dynamic else str(next(iter(ranks))),
            "Dynamic" if dynamic else f"{next(iter(alphas)):g}",
            title=Path(out_path).stem,
            extra=extra,
        )
        written = write_kohya(out_path, modules, meta, dtype, inputs=[lo.path for lo in loras], extras=extras)
    finally:
        for lo in loras:
            lo.close()
    return CombineReport(written.path, len(modules), ranks, kept, worst, written.zeroed)


def _extras(lora: LoraFile, strength: float, named) -> dict[str, dict[str, torch.Tensor]]:
    """strength * the whole changes of a file (full/norm modules, diff_b of the others), by suffix."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in lora.modules.items():
        roles = [r for r in m.keys if r != "alpha"] if m.kind in EXTRA_KINDS else [m.bias_role]
        parts = {r: strength * lora.tensor(m, r).to(F32) for r in roles if r is not None}
        if parts:
            out[named(name)] = parts
    return out


def _natural_shape(up: torch.Tensor, down: torch.Tensor) -> tuple[int, ...]:
    return (up.shape[0], *down.shape[1:])


def _same_layout(name: str, factors: list) -> list:
    """1x1-conv and Linear factors of one module made alike (the first file's layout)."""
    want = factors[0][1].ndim
    out = []
    for up, down, alpha, s in factors:
        if down.ndim != want:
            if want == 4 and down.ndim == 2:
                up, down = up[:, :, None, None], down[:, :, None, None]
            elif want == 2 and down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
                up, down = up.flatten(1), down.flatten(1)
            else:
                raise WorkbenchError(f"module {name}: the LoRAs disagree on its kernel shape")
        if down.shape[1:] != factors[0][1].shape[1:] or up.shape[0] != factors[0][0].shape[0]:
            raise WorkbenchError(
                f"module {name}: the LoRAs give it different shapes; are they for one model?"
            )
        out.append((up, down, alpha, s))
    return out


def _renamer(base: str | os.PathLike, family: str | None):
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.lora.names import family_of_layout, lora_targets, name_index

    with open_checkpoint(base) as ckpt:
        infos = dict(ckpt.infos)
    fam = family_of_layout(infos)
    if family is not None and family != fam:
        raise WorkbenchError(f"{base} is {fam}, the LoRAs are for {family}")
    index = name_index(lora_targets(infos, fam), fam)

    def rename(lora: LoraFile, name: str) -> str:
        t = index.get(name)
        if t is None:
            raise WorkbenchError(f"{lora.path}: module {name} matches nothing in {base}")
        return t.name

    return rename
