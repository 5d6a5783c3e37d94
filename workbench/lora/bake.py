"""Bind a LoRA file to a base checkpoint (headers only) and add its weight changes to the base's
LDM tensors, key by key: the piece the merge engine's `lora` step calls.

Binding checks everything from the two headers before any tensor data is read (LORA.md pitfall 3):
the families agree, every module names a module of the base, and every module's change has the
shape of the weight it lands on (1x1 conv <-> Linear reshaped; anything else refused, naming the
module). Applying computes in float32: W' = W + m * dW per module; OpenCLIP's fused q/k/v get
each delta on its row slice, `text_projection` the transposed delta. A module's bias change
(`diff_b`, `b_norm`) is bound to the bias key as a module of its own (kind "bias") and, like LyCORIS
full/norm modules, goes through `LoraFile.delta` (b' = b + m * diff_b; no alpha).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workbench.checkpoint.lora_format import LoraFile, LoraModule, lora_family
from workbench.checkpoint.safetensors_io import TensorInfo
from workbench.errors import WorkbenchError
from workbench.lora.names import Target, lora_targets, name_index

if TYPE_CHECKING:
    import torch

# Output dtypes a LoRA's small changes can vanish in, by torch's name (looked up when baking: binding
# a LoRA, from the headers, happens before torch is imported).
LOW_PRECISION = {"F16": "float16", "BF16": "bfloat16"}


@dataclass
class LoraBinding:
    """A LoRA file matched to a base: LDM key -> the (module, target) pairs that change it."""

    lora: LoraFile
    family: str
    by_key: dict[str, list[tuple[LoraModule, Target]]]
    # Counters filled while baking (any thread): entries a nonzero change did not move once cast to
    # the output dtype (fp16/bf16), and the entries a change touched.
    lost: int = 0
    touched: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def modules(self) -> int:
        """Modules of the file that landed (a module's bias half is not counted again)."""
        return sum(1 for pairs in self.by_key.values() for m, _ in pairs if m.kind != "bias")

    def components(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for pairs in self.by_key.values():
            for m, t in pairs:
                if m.kind != "bias":
                    counts[t.component] = counts.get(t.component, 0) + 1
        return counts

    def apply(self, key: str, weight: torch.Tensor, strength: float, out_dtype: str | None = None) -> None:
        """weight (float32, the LDM tensor of `key`, changed in place) += strength * dW of every
        module landing on it. With a low-precision `out_dtype`, counts the entries that a nonzero
        change leaves equal once cast (the change is below what the dtype holds next to the weight).
        Costs a few passes over the tensor, no more: this runs on a third of an SD1.5 UNet."""
        import torch

        if strength == 0.0:
            return
        low = getattr(torch, LOW_PRECISION[out_dtype]) if out_dtype in LOW_PRECISION else None
        before = weight.to(low) if low is not None else None
        unchanged = weight.numel()  # entries no module changes: all, minus each delta's nonzeros
        for module, target in self.by_key[key]:  # factors() / delta() refuse non-finite factors
            part = weight[target.rows[0] : target.rows[1]] if target.rows is not None else weight
            if module.kind == "lora" and "mid" not in module.keys and not target.transpose:
                # fused: W += (strength * alpha / r) * up @ down, no delta tensor, one pass over W
                up, down, scale = self.lora.factors(module)
                part.view(part.shape[0], -1).addmm_(up, down, alpha=strength * scale)
                if low is not None:
                    unchanged -= _nonzero_product(up, down)
                continue
            delta = self.lora.delta(module, target.shape)
            if low is not None:
                unchanged -= int(torch.count_nonzero(delta))
            if target.transpose:
                weight.add_(delta.T, alpha=strength)
            else:
                part.add_(delta.reshape(part.shape), alpha=strength)
        if low is not None:
            same = int(torch.count_nonzero(weight.to(low) == before))
            with self._lock:
                self.lost += max(0, same - unchanged)
                self.touched += weight.numel() - unchanged

    def rows_chunkable(self, key: str) -> bool:
        """Whether every module landing on `key` is a plain LoRA (up @ down, no Tucker mid, not
        transposed): then rows [r0, r1) of the change need only rows [r0, r1) of up, and the engine
        can bake the tensor a cache-sized block of rows at a time."""
        return all(m.kind == "lora" and "mid" not in m.keys and not t.transpose for m, t in self.by_key[key])

    def row_factors(self, key: str) -> list[RowFactors]:
        """The float32 factors of every module landing on `key`, read once per key and worker."""
        import torch

        found = []
        for module, target in self.by_key[key]:
            up, down, scale = self.lora.factors(module)
            first = target.rows[0] if target.rows is not None else 0
            nonzero_rows = torch.cumsum((up != 0).any(dim=1), 0).tolist()
            cols = int((down != 0).any(dim=0).sum())
            found.append(RowFactors(first, up, down, scale, [0, *nonzero_rows], cols))
        return found

    def apply_rows(
        self,
        chunk: torch.Tensor,
        lo: int,
        factors: list[RowFactors],
        strength: float,
        before: torch.Tensor | None = None,
    ) -> None:
        """Like `apply`, on a flat float32 chunk of whole rows starting at element `lo` of the tensor:
        each module adds strength * scale * up[rows] @ down to the rows it owns. With `before` (a
        buffer of the chunk's size in the fp16/bf16 output dtype), counts the changes the cast loses."""
        import torch

        if strength == 0.0:
            return
        width = factors[0].down.shape[1]
        r0 = lo // width
        r1 = r0 + chunk.numel() // width
        rows = chunk.view(r1 - r0, width)
        if before is not None:
            before.copy_(chunk)
        changed = 0
        for f in factors:
            a, b = max(r0, f.first), min(r1, f.first + f.up.shape[0])
            if a >= b:
                continue
            rows[a - r0 : b - r0].addmm_(f.up[a - f.first : b - f.first], f.down, alpha=strength * f.scale)
            changed += (f.nonzero_rows[b - f.first] - f.nonzero_rows[a - f.first]) * f.nonzero_cols
        if before is not None and changed:
            # entries with the same bits after the cast; xor + count_nonzero on int16 is 2-5x faster
            # here than any comparison (torch builds its bool result element by element)
            after = chunk.to(before.dtype).view(torch.int16)
            same = chunk.numel() - int(torch.count_nonzero(after.bitwise_xor_(before.view(torch.int16))))
            with self._lock:
                self.lost += max(0, same - (chunk.numel() - changed))
                self.touched += changed


@dataclass(frozen=True)
class RowFactors:
    """A plain LoRA module's factors ready for row blocks: dW[first + i] = scale * up[i] @ down."""

    first: int  # the first row of the tensor the module owns (its q/k/v slice of a fused tensor)
    up: torch.Tensor  # [rows, r] float32
    down: torch.Tensor  # [r, width] float32
    scale: float  # alpha / r
    nonzero_rows: list[int]  # nonzero_rows[i]: rows of up[:i] that are not all zero
    nonzero_cols: int  # columns of down that are not all zero


def _nonzero_product(up: torch.Tensor, down: torch.Tensor) -> int:
    """Entries of up @ down that are not zero: all but the rows of a zero row of up and the columns
    of a zero column of down (exact but for sums that cancel to exactly 0, which have measure 0)."""
    rows = int((up != 0).any(dim=1).sum())
    cols = int((down != 0).any(dim=0).sum())
    return rows * cols


def bind_lora(
    lora: LoraFile, base_infos: Mapping[str, TensorInfo], base_name: str, base_layout: str
) -> LoraBinding:
    """Match every module of `lora` to the base's LDM keys, from headers only.

    Refuses (WorkbenchError, one line): a LoRA of another family; DoRA modules; modules matching
    nothing in the base (how many, and which); a module whose change has another shape than the
    weight it names (the first one)."""
    family = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}.get(base_layout)
    if family is None:
        raise WorkbenchError(
            f"{base_name} is {base_layout}: LoRAs are baked into sd1, sd2 or sdxl checkpoints"
        )
    lora_fam, how = lora_family(lora)
    if lora_fam is not None and lora_fam != family:
        first = next(iter(lora.modules))
        raise WorkbenchError(
            f"{lora.path} is a LoRA for {lora_fam} (from its {how}), {base_name} is {family}: refused before "
            f"reading any tensor (first module: {first})"
        )
    targets = lora_targets(base_infos, family)
    index = name_index(targets, family)
    by_key: dict[str, list[tuple[LoraModule, Target]]] = {}
    unmatched: list[str] = []
    seen: dict[str, str] = {}
    for name, module in lora.modules.items():
        if "dora_scale" in module.keys:
            raise WorkbenchError(
                f"{lora.path}: module {name} is DoRA (dora_scale): wb cannot bake DoRA modules"
            )
        target = index.get(name)
        if target is None:
            unmatched.append(name)
            continue
        if target.name in seen:
            raise WorkbenchError(
                f"{lora.path}: modules {seen[target.name]} and {name} both change {target.name}"
            )
        seen[target.name] = name
        if module.has_weight:
            _check_shape(lora, module, target)
            by_key.setdefault(target.key, []).append((module, target))
        bias = module.bias_part()  # diff_b / b_norm: the module's bias, a whole-tensor change
        if bias is not None:
            bias_target = target.bias_target(base_infos)
            if bias_target is None:
                raise WorkbenchError(
                    f"{lora.path}: module {name} changes a bias ({bias.keys['bias']}), "
                    f"{target.key} has none in {base_name}"
                )
            _check_shape(lora, bias, bias_target)
            by_key.setdefault(bias_target.key, []).append((bias, bias_target))
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        raise WorkbenchError(
            f"{lora.path}: {len(unmatched)} of {len(lora.modules)} modules match nothing in {base_name} "
            f"({shown})"
        )
    return LoraBinding(lora, family, by_key)


def _check_shape(lora: LoraFile, module: LoraModule, target: Target) -> None:
    want = target.shape
    numel = 1
    for d in want:
        numel *= d
    if module.out_features != want[0] or module.numel != numel:
        got = _described_shape(module)
        what = f"{list(want)}{' (q/k/v slice)' if target.part is not None else ''}"
        raise WorkbenchError(
            f"{lora.path}: module {module.name} changes a {got} weight, {target.key} is {what}: "
            "refused before reading any tensor"
        )
    if module.kind == "lora" and "mid" not in module.keys:
        down = module.infos["down"].shape
        if len(down) == 4 and len(want) == 4 and tuple(down[2:]) != tuple(want[2:]):
            raise WorkbenchError(
                f"{lora.path}: module {module.name} has a {down[2]}x{down[3]} kernel, {target.key} "
                f"has {want[2]}x{want[3]}"
            )


def _described_shape(module: LoraModule) -> str:
    if module.kind == "lora":
        down = module.infos["down"].shape
        return str([module.out_features, *down[1:]])
    if module.kind in ("full", "norm", "bias"):
        return str(list(module._whole().shape))
    return f"{module.numel}-element"
